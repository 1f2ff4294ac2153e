"""A user's own head class, saved with `register_for_auto_class`, loads as itself: the `auto_map` saved in
config.json wins over the family's defaults, so its head weights are not dropped."""

import subprocess
import sys
import textwrap

import torch
from conftest import tiny_bert_config


MY_TAGGER = textwrap.dedent(
    """
    from torch import nn

    from hf_relpos import RelPosBertModel, RelPosBertPreTrainedModel


    class MyTagger(RelPosBertPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.bert = RelPosBertModel(config, add_pooling_layer=False)
            self.tagger = nn.Linear(config.hidden_size, 3)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return self.tagger(self.bert(input_ids, attention_mask=attention_mask).last_hidden_state)
    """
)

LOADER = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(sys.argv[1], trust_remote_code=True)
    print(type(model).__name__)
    torch.save(model(torch.arange(3, 11)[None]).detach(), sys.argv[2])
    """
)


def test_saved_auto_map_of_a_custom_head_is_kept_on_load(tmp_path, monkeypatch):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "my_tagger.py").write_text(MY_TAGGER)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    from my_tagger import MyTagger

    MyTagger.register_for_auto_class("AutoModelForTokenClassification")
    torch.manual_seed(0)
    model = MyTagger(tiny_bert_config(position_embedding_type="alibi")).eval()
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        expected = model(torch.arange(3, 11)[None])

    # A fresh process that has never imported my_tagger: the class comes from the saved folder.
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "saved"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MyTagger"]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-6, rtol=1e-5)


def test_family_classes_prefixed_by_a_hub_load_point_to_the_saved_code_again():
    """transformers prefixes auto_map entries with the repo they were loaded from; the family's own classes are
    saved beside the config, so they lose the prefix, while a user's class keeps its entry."""
    config = tiny_bert_config(auto_map={
        "AutoModel": "user/repo--modeling_relpos_bert.RelPosBertModel",
        "AutoModelForTokenClassification": "user/repo--my_tagger.MyTagger",
    })
    assert config.auto_map["AutoModel"] == "modeling_relpos_bert.RelPosBertModel"
    assert config.auto_map["AutoModelForTokenClassification"] == "user/repo--my_tagger.MyTagger"
    assert config.auto_map["AutoModelForMaskedLM"] == "modeling_relpos_bert.RelPosBertForMaskedLM"
