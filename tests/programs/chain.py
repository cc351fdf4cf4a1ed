"""A known Python call chain for the profiler's tests:
    <module> -> py_outer -> py_middle -> py_inner (busy loop)
Usage: python3 chain.py SECONDS"""
import sys
import time


def py_inner(end):
    x = 0
    while time.monotonic() < end:
        for i in range(10000):
            x = (x * 31 + i) % 1000003
    return x


def py_middle(end):
    return py_inner(end) + 1


def py_outer(end):
    return py_middle(end) + 1


py_outer(time.monotonic() + float(sys.argv[1] if len(sys.argv) > 1 else 10))
