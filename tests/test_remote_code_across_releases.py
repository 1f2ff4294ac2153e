"""A folder saved by hf_relpos loads, runs and generates identically under the oldest and the newest tested
transformers, each in a clean process without hf_relpos; the saved code warns once outside the tested range.

The other release's interpreter: run from the oldest venv (`make test-oldest`), it is the base interpreter with the
newest transformers; run with the newest, it is the oldest venv's, when `make test-oldest` has built it.
"""

import configparser
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import WITHOUT_HF_RELPOS, clean_env, tiny_bert_config, tiny_gpt_config
from test_remote_code_decoder import perturb_
from transformers import EncoderDecoderModel

import hf_relpos
from hf_relpos import POSITION_ENCODINGS, RelPosBertModel, RelPosGPTForCausalLM
from hf_relpos.configuration_relpos import TESTED_TRANSFORMERS, release


ROOT = Path(__file__).resolve().parent.parent
OLDEST_PYTHON = ROOT / "build" / "venv-oldest" / "bin" / "python"
NEW_TOKENS = 5
PAD, BOS, EOS = 0, 1, 2
UNTESTED = "was tested with transformers"

# Runs in a clean interpreter: hf_relpos is unimportable, so only the code saved with each folder runs.
CHILD = WITHOUT_HF_RELPOS + textwrap.dedent(
    """
    import json
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, EncoderDecoderModel

    reference = torch.load("reference.pt")
    report = {"transformers": transformers.__version__, "models": {}}
    for name, ref in reference["causal_lm"].items():
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(ref["ids"], attention_mask=ref["mask"]).logits
        tokens = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens=ref["new"],
                                min_new_tokens=ref["new"], do_sample=False)
        report["models"][name] = {"logits": (logits - ref["logits"]).abs().max().item(),
                                  "tokens": tokens.tolist() == ref["tokens"].tolist()}
    ref = reference["seq2seq"]
    encoder = AutoModel.from_pretrained("seq2seq_encoder", trust_remote_code=True)
    decoder = AutoModelForCausalLM.from_pretrained("seq2seq_decoder", trust_remote_code=True)
    # EncoderDecoderConfig rebuilds its parts by model_type: remote code's configs must be registered by hand.
    for config in (encoder.config, decoder.config):
        AutoConfig.register(config.model_type, type(config))
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    tokens = model.generate(ref["ids"], attention_mask=ref["mask"], decoder_start_token_id=ref["start"],
                            pad_token_id=0, max_new_tokens=ref["new"], min_new_tokens=ref["new"], do_sample=False)
    beams = model.generate(ref["ids"], attention_mask=ref["mask"], decoder_start_token_id=ref["start"],
                           pad_token_id=0, max_new_tokens=ref["new"], num_beams=3, do_sample=False)
    report["models"]["seq2seq"] = {"logits": 0.0, "tokens": tokens.tolist() == ref["tokens"].tolist()
                                   and beams.tolist() == ref["beams"].tolist()}
    print(json.dumps(report))
    """
)


def other_release_interpreter() -> str:
    """The interpreter of the other tested transformers release (see the module docstring), or a skip."""
    if sys.prefix != sys.base_prefix and release(transformers.__version__) == release(TESTED_TRANSFORMERS[0]):
        return sys._base_executable
    if not OLDEST_PYTHON.exists():
        pytest.skip(f"{OLDEST_PYTHON.relative_to(ROOT)} is absent: `make test-oldest` builds it and runs this test")
    return str(OLDEST_PYTHON)


def run_child(interpreter: str, folder: Path, code: str = CHILD) -> subprocess.CompletedProcess:
    env = clean_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    HF_MODULES_CACHE=str(folder / f"modules-{Path(interpreter).parent.parent.name}"))
    result = subprocess.run([interpreter, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def saved_tree(tmp_path_factory):
    """A causal LM per encoding and an encoder–decoder pair, saved by this process, with reference outputs."""
    root = tmp_path_factory.mktemp("across_releases")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    reference = {"causal_lm": {}}
    for name in POSITION_ENCODINGS:
        torch.manual_seed(0)
        model = RelPosGPTForCausalLM(tiny_gpt_config(name)).eval()
        perturb_(model)
        model.save_pretrained(root / name)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False)
        reference["causal_lm"][name] = {"ids": ids, "mask": mask, "logits": logits, "tokens": tokens,
                                        "new": NEW_TOKENS}
    torch.manual_seed(0)
    encoder = RelPosBertModel(tiny_bert_config(position_embedding_type="t5"))
    decoder = RelPosGPTForCausalLM(tiny_gpt_config("rope", add_cross_attention=True))
    perturb_(encoder)
    perturb_(decoder)
    encoder.save_pretrained(root / "seq2seq_encoder")
    decoder.save_pretrained(root / "seq2seq_decoder")
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    common = dict(attention_mask=mask, decoder_start_token_id=BOS, pad_token_id=PAD, max_new_tokens=NEW_TOKENS,
                  do_sample=False)
    reference["seq2seq"] = {
        "ids": ids, "mask": mask, "start": BOS, "new": NEW_TOKENS,
        "tokens": model.generate(ids, min_new_tokens=NEW_TOKENS, **common),
        "beams": model.generate(ids, num_beams=3, **common),
    }
    torch.save(reference, root / "reference.pt")
    return root


def test_config_json_records_the_hf_relpos_version(saved_tree):
    for folder in ("rope", "seq2seq_encoder", "seq2seq_decoder"):
        assert json.loads((saved_tree / folder / "config.json").read_text())["hf_relpos_version"] == \
            hf_relpos.__version__


def test_setup_cfg_claims_the_tested_transformers_range():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    oldest, below = TESTED_TRANSFORMERS
    assert f"transformers>={oldest},<{below}" in setup["options"]["install_requires"].split()


def test_saved_folders_generate_identically_under_the_oldest_and_newest_transformers(saved_tree):
    reports = [json.loads(run_child(interpreter, saved_tree).stdout.strip().splitlines()[-1])
               for interpreter in (sys.executable, other_release_interpreter())]
    versions = {release(report["transformers"]) for report in reports}
    assert len(versions) == 2, versions
    assert release(TESTED_TRANSFORMERS[0]) in versions
    assert set(reports[0]["models"]) == set(POSITION_ENCODINGS) | {"seq2seq"}
    for report in reports:
        for name, entry in report["models"].items():
            assert entry["tokens"], (report["transformers"], name)
            assert entry["logits"] <= 1e-6, (report["transformers"], name, entry)


def test_saved_code_warns_once_naming_both_versions_outside_the_tested_range(saved_tree, tmp_path):
    folder = tmp_path / "untested"
    folder.mkdir()
    for path in (saved_tree / "t5").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    code = folder / "configuration_relpos.py"
    source, count = re.subn(r"^TESTED_TRANSFORMERS = .*$", 'TESTED_TRANSFORMERS = ("4.0.0", "5.0.0")',
                            code.read_text(), flags=re.MULTILINE)
    assert count == 1
    code.write_text(source)
    load_twice = WITHOUT_HF_RELPOS + textwrap.dedent(
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        AutoConfig.from_pretrained(".", trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(".", trust_remote_code=True)
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
        """
    )
    warned = run_child(sys.executable, folder, load_twice).stderr
    assert warned.count(UNTESTED) == 1, warned
    line = next(line for line in warned.splitlines() if UNTESTED in line)
    assert hf_relpos.__version__ in line and transformers.__version__ in line and ">=4.0.0,<5.0.0" in line


def test_saved_code_is_silent_inside_the_tested_range(saved_tree):
    quiet = WITHOUT_HF_RELPOS + textwrap.dedent(
        """
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(".", trust_remote_code=True)
        """
    )
    assert UNTESTED not in run_child(sys.executable, saved_tree / "alibi", quiet).stderr
