"""evaluate/: measure a model already in memory: benchmarks, loss and speed.

- `benchmarks`: which benchmarks exist and what a request may ask, checked up front;
- `run`: `evaluate()`, lm-evaluation-harness tasks and next-token loss;
- `lm_eval_tasks`: offline copies of lm-eval's stock tasks on bundled data;
- `scoring`: lm-eval's HFLM scoring each shared few-shot prefix once;
- `speed`: prefill and decode throughput, bytes and peak memory of a variant against its base.

May import: method, models, store, errors (not heal, its sibling).
"""
