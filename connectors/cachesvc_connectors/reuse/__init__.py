"""Engine-neutral reuse decisions (no torch, no transformers): plans, reuse profiles, the
cost model, plan choice and the drift guard's bookkeeping. Every connector (HF today, vLLM
and the cross-context path next) uses these and supplies only what needs its engine: a
calibrated cost model and a verifier that answers a prompt both ways."""

from cachesvc_connectors.reuse.cost import CostModel
from cachesvc_connectors.reuse.drift import DemotionEvent, DriftGuard, DriftOptions, Verifier
from cachesvc_connectors.reuse.plan import Plan, blend_shares
from cachesvc_connectors.reuse.planner import Choice, PlanPolicy, PlanSelector, choose
from cachesvc_connectors.reuse.profile import (PROFILE_FORMAT, LayerSensitivity, PlanRow, ProfileFormatError,
                                               ReuseProfile, TtftSetting, best_plan)

__all__ = ["PROFILE_FORMAT", "Choice", "CostModel", "DemotionEvent", "DriftGuard", "DriftOptions",
           "LayerSensitivity", "Plan", "PlanPolicy", "PlanRow", "PlanSelector", "ProfileFormatError",
           "ReuseProfile", "TtftSetting", "Verifier", "best_plan", "blend_shares", "choose"]
