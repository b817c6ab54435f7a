"""Measuring dptrain: `dptrain scale` (scaling across worker counts, floors, the cost model)
and `dptrain bench` (the engine against hand-written numpy and PyTorch).

    scale.py         the `dptrain scale` command
    measure.py       its measurements and their arithmetic
    report.py        its report, tables and plots
    costmodel.py     the step-time model fitted to them
    hooks.py         the trainer's actors driven from outside its public API
    bench.py         `dptrain bench`: the MLP step and memory
    bench_layers.py  the conv and transformer layers, timed
"""
