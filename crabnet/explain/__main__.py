"""python -m crabnet.explain: see crabnet/explain/run.py."""

from crabnet.explain.run import main, parse_args

raise SystemExit(main(**vars(parse_args())))
