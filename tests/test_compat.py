import dataclasses

from posttrain.compat import cache_kwarg, checkpointing_args


@dataclasses.dataclass
class NewArgs:
    activation_checkpointing: bool = False
    activation_checkpointing_kwargs: dict | None = None


@dataclasses.dataclass
class OldArgs:
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict | None = None


def test_checkpointing_fields_follow_the_installed_names():
    kw = {"use_reentrant": False, "every_n_layers": 2}
    assert checkpointing_args(NewArgs, True, kw) == {"activation_checkpointing": True, "activation_checkpointing_kwargs": kw}
    assert checkpointing_args(OldArgs, True, kw) == {"gradient_checkpointing": True,
                                                     "gradient_checkpointing_kwargs": {"use_reentrant": False}}


def test_cache_keyword_matches_the_model_forward():
    class New:
        def forward(self, input_ids, cache=None): ...

    class Old:
        def forward(self, input_ids, past_key_values=None): ...

    assert cache_kwarg(New()) == "cache" and cache_kwarg(Old()) == "past_key_values"
