"""Benchmark harness: the gateway against a DIY `sshd` + `docker exec` set-up and plain sshd.

`python -m bench` (full run, ~15 min, writes docs/benchmarks.md) or `python -m bench --quick`
(tiny sizes, for CI); `python -m bench noisy` times bob's warm login while alice abuses her
caps (bench/noisy.py).  Everything runs on this machine, on 127.0.0.1 only.
"""
