"""Speed and memory benchmarks (``make bench``): ratios measured within one run, tables + JSON."""
