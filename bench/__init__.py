"""The side-by-side benchmark of issue 6: a fake upstream, a bare proxy, Meterline and (when installed) LiteLLM,
driven from a separate load-generator process; run it with `python -m bench [--quick]`."""
