"""The held-out shapes evaluation: regions, colours and PSNR are scored against exact ground truth."""
import numpy as np

from training.evaluation import EDITS, format_report, held_out_cases, nearest_colour, psnr, score
from training.synthetic import PALETTE


def test_held_out_cases_are_balanced_seeded_and_have_regions():
    cases = held_out_cases(30, seed=5)
    assert [c.edit for c in cases].count("remove") == 10 and {c.edit for c in cases} == set(EDITS)
    again = held_out_cases(30, seed=5)
    assert all(a.instruction == b.instruction and np.array_equal(a.target, b.target) for a, b in zip(cases, again))
    assert all(c.region.any() and not c.region.all() for c in cases)
    assert all(c.colour in c.instruction for c in cases if c.edit != "remove")


def test_the_ground_truth_succeeds_and_the_unedited_input_fails():
    for case in held_out_cases(60, seed=7):
        truth = score(case, case.target)
        assert truth.success and truth.psnr > 90
        unchanged = score(case, np.asarray(case.image))
        assert not unchanged.colour_ok and not unchanged.success


def test_damage_outside_the_region_fails_the_psnr_test():
    case = next(c for c in held_out_cases(3, seed=2) if c.edit == "recolour")
    damaged = case.target.copy()
    damaged[~case.region] = 255 - damaged[~case.region]
    result = score(case, damaged)
    assert result.colour_ok and result.psnr < 25 and not result.success


def test_nearest_colour_and_report():
    assert all(nearest_colour(np.asarray(rgb, float) + 10) == name for name, rgb in PALETTE.items())
    report = {"count": 3, "seed": 1, "steps": 2, "sampler": "euler", "text_guidance": 5.0, "image_guidance": 1.5,
              "unet_evaluations_per_edit": 6.0,
              "edits": {"remove": {
        "n": 3, "success": 66.7, "colour_correct": 100.0, "untouched_psnr_ok": 66.7, "median_untouched_psnr_db": 30.2}}}
    table = format_report(report)
    assert "6.0 UNet evaluations per edit" in table
    assert "| remove | 3 | 66.7% | 100.0% | 66.7% | 30.2 dB |" in table and "text guidance 5.0" in table
    report["cases"] = [{"edit": "remove", "shapes": n, "success": ok} for n, ok in ((2, True), (3, True), (3, False))]
    assert "| remove | 100% of 1 | 50% of 2 |" in format_report(report)


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255**2 / 48
    assert abs(psnr(a, b, peak=255.0) - 10 * np.log10(48)) < 1e-9
    assert psnr(a, a, peak=255.0) > 190
