"""The pieces of benchmarks/bench_wan.py (run it as `python benchmarks/bench_wan.py ...`; it holds the
run and the command line): the 1.3B transformer, its shapes, inputs, recipe and the stand-in
pipeline in model.py, the clocks and the measurements in timing.py.
"""
