import logging

from engine.cpu import cpu_flags, cpu_precision, native_dtype

ZEN3 = frozenset({"avx2", "fma", "sse4_2"})  # the 2-core host of 2026-11-30: bf16 emulated
ZEN4 = ZEN3 | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_tile", "avx512_fp16"}


def test_reduced_precision_runs_only_where_the_cpu_has_it():
    assert cpu_precision("float32", ZEN3) == ("float32", None)
    dtype, why = cpu_precision("bfloat16", ZEN3)
    assert dtype == "float32" and "bfloat16 is emulated on this CPU" in why
    assert cpu_precision("bfloat16", ZEN4) == ("bfloat16", None)
    assert cpu_precision("float16", ZEN4)[0] == "float32"  # no AVX-512 FP16 on Zen 4
    assert native_dtype("float16", SAPPHIRE_RAPIDS) and native_dtype("bfloat16", frozenset({"bf16", "asimd"}))
    assert isinstance(cpu_flags(), frozenset)


def test_the_torch_backend_warns_and_runs_float32_where_bf16_is_emulated(tiny_model, caplog):
    """On this host's CPU, whichever kind it is: bf16 where native, else float32 with the warning."""
    from engine import EditPipeline

    emulated = not native_dtype("bfloat16")
    with caplog.at_level(logging.WARNING):
        pipe = EditPipeline.from_pretrained(tiny_model, dtype="bfloat16", progress=False)
    assert (str(pipe.backend.dtype) == "torch.float32") == emulated
    assert ("emulated on this CPU" in caplog.text) == emulated
