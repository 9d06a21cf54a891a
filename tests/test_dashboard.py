"""dashboard.py: the feature page in a real headless browser (rendering, navigation, search,
escaping of every dataset text)."""
import json
import os

import pytest

from helpers import CHROMIUM, chromium_dom
from dashboard import main

# --- dashboard in a real headless browser ---------------------------------------------------------
EVIL = ["<script>document.title='pwned'</script>", "</textarea>", "\"quoted\" & 'single'",
        "a<b>c</b>", "__DATA__ __FEATURES__"]  # the template's placeholders, as data


def features_json(tmp_path):
    feats = []
    for i, name in enumerate(["L0.gate_proj+", "L0.q_proj+", "L1.down_proj+", "L0.gate_proj-",
                              "sae0", "sae1"]):
        ex = dict(value=1.5 + i, doc=i, source=f"row {i}", pos=3, doc_length=9, target=1,
                  tokens=EVIL[:3] + EVIL[4:], acts=[0.1, 1.5 + i, -0.4, 0.2])
        q = dict(q50=0.0, q90=0.1 * i, q99=0.5 * i + 0.1, q999=1.0)
        feats.append(dict(id=i, name=name, freq=10 ** -(i + 1), quantiles=q, top=[ex],
                          random=[dict(ex, value=0.2)],
                          promotes=EVIL if name == "L1.down_proj+" else None))
    d = dict(acts="runs/__FEATURES__/acts", tokens=123, features=feats)
    for f in feats:
        if f["promotes"] is None:
            del f["promotes"]
    (tmp_path / "features.json").write_text(json.dumps(d))
    return tmp_path / "features.json"


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium is not installed (.ci/run installs it)")
def test_dashboard_renders_navigates_searches_and_escapes(tmp_path):
    f = features_json(tmp_path)
    out = tmp_path / "dash.html"
    main(["--features", str(f), "--out", str(out)])
    html = out.read_text()
    assert "http" not in html.replace("http://www.w3.org/2000/svg",
                                      "")  # self-contained: nothing fetched
    assert "<script>document.title" not in html  # the data cannot close its script element
    dom, log = chromium_dom(out.as_uri() + "#f=2")
    assert "Uncaught" not in log and "CONSOLE" not in log.replace("CONSOLE(0)", ""), log[-2000:]
    assert "<title>rank1 dashboard</title>" in dom  # no script from the data ran
    assert "#2  L1.down_proj+" in dom  # navigated to the feature in the hash
    assert ("&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
            and "&lt;/textarea&gt;" in dom)
    assert "\"quoted\" &amp; 'single'" in dom
    assert "__DATA__ __FEATURES__" in dom  # placeholders in the data stay as they are
    assert "promotes through the unembedding" in dom
    assert "Adapter scalar magnitude" in dom and "SAE feature frequency" in dom
    dom, _ = chromium_dom(out.as_uri() + "#q=sae")
    # the search keeps sae0 and sae1, and shows the first
    assert dom.count('class="it') == 2 and "#4  sae0" in dom


def test_feature_ids_are_integers_so_no_attribute_can_be_injected(tmp_path):
    f = features_json(tmp_path)
    d = json.loads(f.read_text())
    for bad in ('0"><img src=x onerror="document.title=1', "3", 2.0, True, None):
        d["features"][1]["id"] = bad
        f.write_text(json.dumps(d))
        with pytest.raises(SystemExit, match=r"features\[1\]: 'id' must be an integer"):
            main(["--features", str(f), "--out", str(tmp_path / "d.html")])
    assert not (tmp_path / "d.html").exists()


def test_promoted_tokens_read_two_tensors_as_the_whole_model_gives_them(tmp_path):
    """The dashboard reads only the head, the final norm and the adapter's b vectors (not a 65 GB
    model): the tokens equal those of W (g * b) computed on the loaded model."""
    from dashboard import promoted_tokens
    from data import Tokenizer
    from helpers import tiny_env
    from lora import adapters, site_label
    from lora_files import load_model
    env = tiny_env(tmp_path)
    tok = Tokenizer(str(env / "model"))
    got = promoted_tokens(str(env / "model"), str(env / "adapter"), tok)
    model, _ = load_model(str(env / "model"), str(env / "adapter"))
    W, g = model.lm_head.weight.float(), model.model.norm.weight.float()
    want = {}
    for a in adapters(model):
        if a.target in ("down_proj", "o_proj"):
            logit = W @ (g * a.lora_B[:, 0].float())
            for sign, v in (("+", logit), ("-", -logit)):
                want[site_label(a.layer, a.target) + sign] = [
                    tok.id_to_token_str(i) for i in v.topk(8).indices.tolist()]
    assert got == want and len(got) == 2 * 2 * 3
