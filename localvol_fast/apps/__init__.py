"""Programs built on the library (the CLI, the demo, the paper's experiments, plots, the benchmarks'
baseline); nothing in the library imports them."""
