"""Trace analysis: statistics (`stats`), hit-rate curves and the learned allocation (`learned`), plots
(`plots`), and the markdown report with its command line (`report`)."""

from .learned import (  # noqa: F401
    BUDGET_FRACTIONS, LearnedResult, budget_grid, hit_rate_curves, learn_allocation,
)
from .plots import hit_rate_figure, plot_hit_rates  # noqa: F401
from .report import add_analyze_parser, analyze_trace, cmd_analyze, write_report  # noqa: F401
from .stats import (  # noqa: F401
    RARE_SHARE, Accuracy, popularity, prediction_accuracy, rare_experts, reuse_distances, router_entropy,
    transitions,
)
