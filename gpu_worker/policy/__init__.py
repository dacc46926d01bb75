"""The policy layer, torch-free and IO-free: replacement policies, allocations, predictors and the
cache ledger that the worker's ExpertCache and the offline simulator both drive."""

from .allocation import (  # noqa: F401
    ALLOCATION_NAMES, Allocation, AllocationFileError, LearnedAllocation, ShallowFavoringAllocation,
    UniformAllocation, make_allocation,
)
from .belady import BeladyPolicy  # noqa: F401
from .ledger import (  # noqa: F401
    CacheBudgetError, CacheError, CacheLedger, CacheStats, LayerLedger, LayerStats, StepOutcome,
)
from .replacement import (  # noqa: F401
    POLICY_NAMES, ARCPolicy, LFUDecayPolicy, LFUPolicy, LRUPolicy, PolicyError, ReplacementPolicy,
    make_policy_factory,
)
