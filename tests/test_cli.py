"""The shared help formatter: every default shown once, none invented."""

from crabnet.cli import make_parser


def _help() -> str:
    p = make_parser("doc")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dataset", default=None, help="dataset (default: all)")
    p.add_argument("--layers", default=None, help="layers")
    p.add_argument("--quick", action="store_true", help="demo")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second (default 10)")
    return " ".join(p.format_help().split())


def test_zero_default_is_shown():
    assert "random seed (default: 0)" in _help()


def test_stated_or_missing_defaults_are_not_repeated():
    text = _help()
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert text.count("default: all") == 1
    assert "(default 10) (default" not in text
