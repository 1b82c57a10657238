"""The only modules that touch a library's private names: one per library, each with the
version it was checked against and a `missing()` that tests/test_internals.py runs."""
