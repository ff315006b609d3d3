"""`lenet-dist bench`: a throughput matrix, timed training commands, a process-count sweep, saved results compared.

    lenet-dist bench [--quick] [--json out.json] [--chart out.png]
    lenet-dist bench compare A.json B.json ...

suite.py runs it all in order; measure.py times one matrix cell in this process; runs.py starts the
real training commands; machine.py describes the machine; report.py prints, charts and saves;
compare.py puts saved results side by side (and imports no torch).
"""
