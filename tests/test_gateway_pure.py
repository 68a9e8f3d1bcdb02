"""The gateway's pure parts: stop strings over streamed text, the key rule."""

from __future__ import annotations

import pytest

from iserve.gateway.config import GatewayConfig, check
from iserve.gateway.stops import StopMatcher


def test_stop_matcher_holds_back_only_what_may_start_a_stop():
    m = StopMatcher(["END", "\n\n"])
    assert m.push("abc E") == ("abc ", False)  # "E" may start "END"
    assert m.push("x") == ("Ex", False)
    assert m.push("yy\n") == ("yy", False)
    assert m.push("\nrest") == ("", True)
    assert m.push("more") == ("", True) and m.flush() == ""
    free = StopMatcher([])
    assert free.push("anything") == ("anything", False)


def test_the_gateway_refuses_to_run_without_a_key_off_loopback():
    with pytest.raises(Exception, match="API key"):
        check(GatewayConfig())
    with pytest.raises(Exception, match="loopback"):
        check(GatewayConfig(no_auth=True, http_host="0.0.0.0"))
    assert check(GatewayConfig(no_auth=True)).no_auth
