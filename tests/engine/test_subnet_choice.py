"""Subnet choice at admission, through the engine: the chooser asks the policy just before a
request joins the batch, and a deferral (admit=False) leaves it waiting.

What these prove: a deferred request holds no block and never reaches the runner, does not stop
others from being admitted, and runs (on the subnet the policy then chooses) once the policy
admits it; the SLA policy, fed by the step durations the runner reports, defers a less important
tier while a more important one is running and would miss its target, and admits it after;
pinned requests bypass the policy; admissions are counted by subnet and tier.
"""

from __future__ import annotations

from policies.snapshots import Decision
from policies.subnet_choice import SlaPolicy
from server.engine.request import RequestStatus
from tests.engine.harness import FULL, LITE, MID, SMALL, build, greedy, prompt, tier


def test_a_policy_deferral_leaves_the_request_waiting_and_it_runs_later():
    """A policy that says admit=False keeps the request waiting (no blocks, no runner step),
    without blocking a pinned request behind it; once the policy admits, it runs on the
    subnet the policy chose."""

    class Gate:
        name = "gate"
        open = False

        def choose(self, req, ctx):
            return Decision("mid", 0, "gate", admit=self.open)

    gate = Gate()
    h = build(policy=gate)
    h.add("chosen", prompt(6), None, greedy(4))
    h.add("pinned", prompt(6, 1), LITE, greedy(4))
    for _ in range(6):
        h.step()
    assert h.scheduler.requests["chosen"].status == RequestStatus.WAITING
    assert h.blocks.num_held("chosen") == 0
    assert not any(r.request_id == "chosen" for s in h.runner.steps for r in s)
    assert h.final("pinned").finish_reason == "length"
    gate.open = True
    h.run()
    assert h.final("chosen").subnet == "mid"
    assert h.tokens("chosen") == h.expected("chosen", MID, greedy(4))
    h.assert_idle()


def test_a_request_aborted_while_deferred_reports_no_subnet():
    """A deferral's subnet is no choice: the request keeps none, so if it ends before it ever
    ran its final output names no subnet (the API then answers an error rather than starting
    the request's other choices on that subnet)."""

    class Never:
        name = "never"

        def choose(self, req, ctx):
            return Decision("small", 0, "never", downgraded=True, admit=False)

    h = build(policy=Never())
    h.add("r", prompt(6), None, greedy(4))
    h.step()
    assert h.scheduler.requests["r"].subnet is None
    out = h.engine.abort("r")
    assert (out.finish_reason, out.subnet) == ("abort", "")
    h.assert_idle()


def test_the_sla_policy_defers_a_less_important_tier_while_a_more_important_one_runs():
    """Every step takes 50 ms, so no subnet meets gold's 20 ms time-per-token target: gold runs
    on the cheapest subnet, and bronze (less important) is deferred while gold runs, since it
    would slow gold further; once gold is done, bronze is admitted, on the best subnet. The
    chooser learned the step time from the seconds the runner reported."""
    h = build(policy=SlaPolicy(), step_seconds=0.05)
    for i in range(12):  # steps for the cost model to learn from
        h.add(f"warm{i}", prompt(4, i), None, greedy(2))
    h.run()
    assert h.chooser.cost.snapshot().samples == len(h.runner.steps)  # one per step
    gold, bronze = tier("gold", priority=0, tpot=0.02), tier("bronze", priority=1)
    h.add("g", prompt(4), None, greedy(10), tier=gold)
    h.step()
    h.add("b", prompt(4, 1), None, greedy(3), tier=bronze)
    while "g" in h.scheduler.requests:
        h.step()
        if "g" in h.scheduler.requests:
            assert h.scheduler.requests["b"].status == RequestStatus.WAITING
            assert h.blocks.num_held("b") == 0
    assert h.final("g").subnet == SMALL.name and h.final("g").downgraded
    assert h.chooser.deferrals["bronze"] >= 9
    h.run()
    assert h.final("b").finish_reason == "length"
    # nothing left to protect: bronze (no targets of its own) gets the best subnet
    assert h.final("b").subnet == FULL.name
    assert h.tokens("b") == h.expected("b", FULL, greedy(3))
    assert h.chooser.choices[("small", "gold", False)] == 1
    assert h.chooser.choices[("full", "bronze", False)] == 1
    h.assert_idle()
