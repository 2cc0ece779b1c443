"""asv benchmark suites for bn_fast (see asv.conf.json and common.py)."""
