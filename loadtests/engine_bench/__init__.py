"""The engine benchmark's parts (loadtests/bench_engine.py is its command line): rows and their table,
timing loops, the direct decoders, the vLLM row, the gateway row and its load generator."""
