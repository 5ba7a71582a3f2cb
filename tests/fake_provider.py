"""Ray's fake multi-node provider, with one fix so that a lost node is replaced.

The stock provider tags every node it starts with the autoscaler's launch tags, which say
"uninitialized"; with node updaters disabled nothing ever marks it up to date, and the
autoscaler's liveness check skips nodes that are not up to date. So a node whose raylet dies
stays "pending" forever and is never replaced. This provider starts the raylet synchronously,
so once `create_node` returns the node is up; it tags it so. Loaded by the autoscaler monitor
through `provider: {type: external, module: tests.fake_provider.LocalNodeProvider}`.

A test can also hold launches, as a cloud out of spot capacity does: while the file named by
RAYMOE_FAKE_HOLD_LAUNCHES exists, a launch waits (in the autoscaler's launcher thread).
"""
import os
import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import STATUS_UP_TO_DATE, TAG_RAY_NODE_STATUS


class LocalNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        hold = os.environ.get("RAYMOE_FAKE_HOLD_LAUNCHES")
        while hold and os.path.exists(hold):
            time.sleep(0.2)
        before = set(self._nodes)
        super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        with self.lock:
            for node_id in set(self._nodes) - before:
                self._nodes[node_id]["tags"][TAG_RAY_NODE_STATUS] = STATUS_UP_TO_DATE
