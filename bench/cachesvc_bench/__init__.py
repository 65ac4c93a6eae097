"""The benchmarks behind ``cachesvc bench`` (cachesvc_bench.cli): each prints JSON and a
markdown table and writes a plot, against a baseline or ceiling measured in the same run."""
