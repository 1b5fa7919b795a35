"""GReg for curvprune: growing L2 regularization pruning (GReg-1, GReg-2), structured and unstructured.

Wang, Qin, Zhang & Fu, "Neural Pruning via Growing Regularization", ICLR 2021. The ``greg``
schedule adds a per-group L2 penalty λ ⊙ W to the gradients of the groups it will remove and grows
λ until they are near zero, so removing them barely changes the network (docs/methods/greg.md).
"""

from curvprune_greg.config import GRegConfig
from curvprune_greg.groups import LayerPlan, group_scores, num_pruned
from curvprune_greg.schedule import GRegSchedule

__all__ = ["GRegConfig", "GRegSchedule", "LayerPlan", "group_scores", "num_pruned"]
