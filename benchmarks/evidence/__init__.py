"""The evidence study's parts (issue #26); ``benchmarks/study.py`` is its entry point and documents it."""
