"""The shipped mixer contract (``arch_zoo/testing/test_contract.py``) run by this repository's suite, on every
registered mixer: the built-ins, the fla plugins and the test plugin (``tests/plugin_fixture``)."""

from arch_zoo.testing.test_contract import *  # noqa: F403 - pytest collects the imported tests here
