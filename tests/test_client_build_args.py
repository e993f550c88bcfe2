"""What start_build and plan_build send: the whole numbers the other calls insist on (a float or
a bool neuron was truncated into another neuron's build; a numpy array of neurons crashed)."""

from __future__ import annotations

import numpy as np
import pytest

from n2g.client import _Api


class _Recorder(_Api):
    """The client API over a transport that returns what it was asked."""

    timeout = None

    def _call(self, name, args, timeout):
        return args


@pytest.mark.parametrize("method", ["start_build", "plan_build"])
def test_build_requests_refuse_what_they_would_truncate_and_take_numpy(method):
    call = getattr(_Recorder(), method)
    sent = call(np.array([0, 1]), np.array([3, 7], dtype=np.int32), seed=np.int64(2))
    assert (sent["layers"], sent["neurons"], sent["seed"]) == ([0, 1], [3, 7], 2)
    assert all(type(x) is int for x in [*sent["layers"], *sent["neurons"], sent["seed"]])
    assert call(1, [5])["layers"] == [1]  # one layer, as list_graphs and evaluate take it
    assert call("0-2", sample=4)["layer_spec"] == "0-2"
    for bad in (dict(layers=[0], neurons=[1.7]), dict(layers=[0.9], neurons=[1]), dict(layers=[True], neurons=[1]),
                dict(layers=[0], neurons=[np.float64(3.0)]), dict(layers=[0], sample=2.5),
                dict(layers=[0], sample=4, seed=1.9), dict(layers=[0], sample=4, group_size="8")):
        with pytest.raises(ValueError, match="is not a whole number"):
            call(**bad)
