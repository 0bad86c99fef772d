"""Messages quoting other libraries' errors stay one line, whatever those errors hold."""
from engine.errors import one_line, quote_error


def test_quote_error_takes_the_first_non_empty_line_and_names_the_type():
    assert quote_error(RuntimeError("\n  Exception from src/core.cpp:12:\nmore context")) == (
        "RuntimeError: Exception from src/core.cpp:12:")
    assert quote_error(KeyError()) == "KeyError"  # no message: "".splitlines() is empty
    assert quote_error(ValueError("   \n\n")) == "ValueError"
    assert len(quote_error(OSError("x" * 1000))) == 200


def test_one_line_flattens_and_cuts():
    assert one_line("a\n\tb   c") == "a b c"
    assert one_line("y" * 300, limit=10) == "yyyyyyy..."
