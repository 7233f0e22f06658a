"""The `perf` section applied to a run's networks: layout, attention, compilation (the teacher update's switch,
perf.fused_ema, is read by the strategies; the optimiser's, perf.optimizer, by build_optimizer).

Each switch changes how a step runs, not what it computes (see mokd/config.py PerfConfig); the throughput
profiler (mokd/engine/throughput.py) measures them one by one.
"""

from __future__ import annotations

from mokd.method.network import Network


def apply_perf(network: Network, perf) -> Network:
    """Set a student's or teacher's execution switches in place (after it is on its device); returns it."""
    network.grouped_crops = perf.grouped_crops
    network.backbone.use_channels_last(perf.channels_last)
    network.backbone.use_fused_attention(perf.fused_attention)
    if perf.compile:
        # In place (nn.Module.compile), so parameter names and state dicts stay those of the plain modules.
        # The heads are compiled apart from the backbone: the T-Head also runs on the other model's tokens.
        for module in (network.backbone, network.mlp_head, network.thead):
            if module is not None:
                # Static shapes: each crop resolution gets its own specialised graph instead of one dynamic one.
                module.compile(dynamic=False)
    return network
