"""The offline simulator: traces replayed through the worker's cache ledger (`run`), the prepared trace
(`replay`), configuration and results (`config`), the cost model (`cost`), the command line (`cli`)."""

from .cli import add_simulate_parser, cmd_simulate  # noqa: F401
from .config import (  # noqa: F401
    INF, PIN_MODES, SEMANTICS, SIM_POLICIES, SimConfig, SimResult, SimulationError, parse_budget, worker_config_of,
)
from .cost import PROFILES, CostEstimate, HardwareProfile, estimate_cost, load_profile, resolve_expert_bytes  # noqa
from .replay import Replay  # noqa: F401
from .run import layer_slots, make_sim_allocation, make_sim_predictor, simulate  # noqa: F401
