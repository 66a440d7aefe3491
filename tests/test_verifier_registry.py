"""The open verifier registry: built-ins, `module:function` plug-ins, entry points; reward-source kinds resolve through
it at config load and at scoring."""

import importlib.metadata
import sys

import pytest

from posttrain.config import ConfigError
from rewards.sources import RewardComposer, RewardSourceConfig
from rewards.verifiable import VERIFIERS, get_verifier, verifier_names

PLUGIN = '''
def shouts(message, meta):
    text = message if isinstance(message, str) else message["content"]
    return float(text.isupper() and text.count("!") >= meta.get("bangs", 1))

class Scorers:
    @staticmethod
    def length(message, meta):
        return min(1.0, len(message["content"]) / meta["target"])

def one_arg(message):
    return 1.0

not_a_function = 3
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module `my_verifiers` on the Python path, as a user's own project would have it."""
    (tmp_path / "my_verifiers.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_verifiers", raising=False)  # each test imports its own copy
    yield "my_verifiers"
    sys.modules.pop("my_verifiers", None)


@pytest.fixture
def entry_point(plugin, monkeypatch):
    """An installed package registering `shouting = my_verifiers:shouts` in group posttrain.verifiers."""
    real = importlib.metadata.entry_points
    registered = importlib.metadata.EntryPoints([
        importlib.metadata.EntryPoint("shouting", "my_verifiers:shouts", "posttrain.verifiers"),
        importlib.metadata.EntryPoint("broken", "missing_package.verifiers:check", "posttrain.verifiers"),
        importlib.metadata.EntryPoint("answer", "my_verifiers:shouts", "posttrain.verifiers"),  # cannot shadow
    ])

    def entry_points(**params):
        return registered.select(**params) if params.get("group") == "posttrain.verifiers" else real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_builtins_resolve_to_themselves():
    assert verifier_names()[:len(VERIFIERS)] == tuple(VERIFIERS)
    for name, verify in VERIFIERS.items():
        assert get_verifier(name) is verify


def test_module_function(plugin):
    verify = get_verifier("my_verifiers:shouts")
    assert verify("HELLO!", {}) == 1.0
    assert verify("HELLO!", {"bangs": 2}) == 0.0
    assert verify("Hello!", {}) == 0.0
    length = get_verifier("my_verifiers:Scorers.length")  # a dotted attribute path
    assert length({"role": "assistant", "content": "abcd"}, {"target": 8}) == 0.5


@pytest.mark.parametrize("name, error", [
    ("bleu", r"verifier 'bleu': unknown; known: answer, exact, regex, unit_tests, tool_call, json_schema, "
             r"constraints, or module:function on the Python path"),
    ("no_such_module:check", r"verifier 'no_such_module:check': cannot import module 'no_such_module' "
                             r"\(No module named 'no_such_module'\)"),
    ("my_verifiers:absent", r"verifier 'my_verifiers:absent': module 'my_verifiers' has no attribute 'absent'"),
    ("my_verifiers:Scorers.absent", r"module 'my_verifiers' has no attribute 'Scorers.absent'"),
    ("my_verifiers:not_a_function", r"verifier 'my_verifiers:not_a_function': 3 is not callable"),
    ("my_verifiers:one_arg", r"verifier 'my_verifiers:one_arg': takes \(message\), but a verifier is called as "
                             r"fn\(message, meta\)"),
    ("my_verifiers:", r"verifier 'my_verifiers:': expected module:function"),
    (":shouts", r"verifier ':shouts': expected module:function"),
])
def test_unresolvable_names_fail_naming_the_name(plugin, name, error):
    with pytest.raises(ValueError, match=error):
        get_verifier(name)


def test_entry_points(entry_point):
    assert verifier_names() == (*VERIFIERS, "broken", "shouting")  # "answer" stays the built-in
    assert get_verifier("shouting")("YES!", {}) == 1.0
    assert get_verifier("answer") is VERIFIERS["answer"]
    with pytest.raises(ValueError, match=r"verifier 'broken': entry point 'missing_package.verifiers:check' in "
                                         r"group posttrain.verifiers does not load \(No module named"):
        get_verifier("broken")


def test_source_kind_is_checked_at_config_load(plugin, entry_point):
    assert RewardSourceConfig(kind="my_verifiers:shouts").gate is True  # a plug-in verifier gates like a built-in
    assert RewardSourceConfig(kind="shouting").name == "shouting"
    with pytest.raises(ConfigError, match=r"kind: 'bleu' is not one of rm, judge, answer, .*, constraints, broken, "
                                          r"shouting, or module:function on the Python path"):
        RewardSourceConfig(kind="bleu")
    with pytest.raises(ConfigError, match=r"kind: verifier 'my_verifiers:absent': module 'my_verifiers' has no "
                                          r"attribute 'absent'"):
        RewardSourceConfig(kind="my_verifiers:absent")
    with pytest.raises(ConfigError, match=r"kind: verifier 'broken': entry point"):
        RewardSourceConfig(kind="broken")
    with pytest.raises(ConfigError, match=r"kind: missing; one of rm, judge, answer"):
        RewardSourceConfig(kind="")


def test_composer_scores_with_a_plugin(plugin):
    """Options and the record's meta reach the plug-in; its score is the source's raw score."""
    source = RewardSourceConfig(kind="my_verifiers:shouts", name="loud", options={"bangs": 2})
    records = [{"id": "a", "messages": [{"role": "user", "content": "Shout"}]},
               {"id": "b", "messages": [{"role": "user", "content": "Shout once"}], "meta": {"bangs": 1}}]
    groups = [[{"role": "assistant", "content": c} for c in ("HI!!", "HI!")],
              [{"role": "assistant", "content": c} for c in ("HI!", "hi!")]]
    scored = RewardComposer([source]).score(records, groups)
    assert [[s["scores"]["loud"] for s in group] for group in scored] == [[1.0, 0.0], [1.0, 0.0]]
    assert [[s["reward"] for s in group] for group in scored] == [[1.0, 0.0], [1.0, 0.0]]
