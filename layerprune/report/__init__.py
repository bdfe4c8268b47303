"""report/: draw and publish what the other wings computed; computes nothing of its own.

- `figures`: heatmaps, stability charts, metric and training curves;
- `tradeoff`: quality against speed and bytes, with the Pareto front;
- `leaderboard/`: the nightly leaderboard: its nights (`nights`), figures and page.

May import: method (numbers to draw), models, store, errors; never heal or evaluate.
"""
