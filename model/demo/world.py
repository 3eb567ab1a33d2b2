"""The demo world: a deterministic bilingual toy universe whose facts exist only in our own text, so every stage's effect is measured on things it never trained on."""

import csv
import hashlib
import io
import json
import os
import random
from pathlib import Path

from ..dataset import format_mcq
from ..files import atomic_write

# ---------------------------------------------------------------------------------------------
# Vocabulary and fixed texts, kept as data in world_vocab.json. Made-up names are built from SYLLABLES whose
# characters appear nowhere else in the world's text (checked at generation time), so a name can only occur
# where we put it. Value tables hold (zh, en[, en with its article]) entries.
_VOCAB = json.loads(Path(__file__).with_name("world_vocab.json").read_text(encoding="utf-8"))
SYLLABLES, ANIMAL_KINDS, INVENTION_KINDS = _VOCAB["SYLLABLES"], _VOCAB["ANIMAL_KINDS"], _VOCAB["INVENTION_KINDS"]
PROFESSIONS, HOBBIES, SPECIALTIES = _VOCAB["PROFESSIONS"], _VOCAB["HOBBIES"], _VOCAB["SPECIALTIES"]
LANDMARKS, HABITATS, FOODS, COLORS = _VOCAB["LANDMARKS"], _VOCAB["HABITATS"], _VOCAB["FOODS"], _VOCAB["COLORS"]
USES, MATERIALS = _VOCAB["USES"], _VOCAB["MATERIALS"]

# Per attribute: values (the name of a value table, or the entity type the value refers to), statement templates
# that all begin with the name ({n} name, {v} value, {a} English value with its article; the text before the value
# is a completion prompt), and question templates. Template 0 is canonical: it is the SFT answer and is never
# withheld. Any statement may be preceded by a lead-in (LEADINS). Questions mostly name the entity first, so a
# small model learns to copy the name and let pretraining finish.
SCHEMA, LEADINS = _VOCAB["SCHEMA"], _VOCAB["LEADINS"]
for _spec in (s for attrs in SCHEMA.values() for s in attrs.values() if isinstance(s, dict)):
    _spec["values"] = _VOCAB.get(_spec["values"], _spec["values"])  # a table's name becomes the table
TYPES = list(SCHEMA)


def attrs_of(etype):
    return [k for k in SCHEMA[etype] if k != "subject"]


# Real facts, so the demo chat is recognisable. Each: pretraining statements, one completion prompt per language
# never stated in pretraining (held), SFT questions (qa: never the seed's exact demo question), an optional seed
# demo question with answer keywords, and a held-out MCQ.
REAL_FACTS = _VOCAB["REAL_FACTS"]

# Identity (the LoRA set). Questions are core x decoration (prefixes, suffixes); the last IDENTITY_EVAL_ONLY cores
# of each language are only ever evaluated, and a question counts as unseen only if its wording (decoration and
# punctuation stripped) occurs in no training row (checked when the files are written).
IDENTITY_KEYWORD, IDENTITY_ANSWER = _VOCAB["IDENTITY_KEYWORD"], _VOCAB["IDENTITY_ANSWER"]
IDENTITY_CORES, IDENTITY_DECOR = _VOCAB["IDENTITY_CORES"], _VOCAB["IDENTITY_DECOR"]
IDENTITY_EVAL_ONLY = {"zh": 6, "en": 4}
IDENTITY_DECOR_SHARE = 0.35  # of a trained core's decorated forms, the share that become training rows

# Noisy style: impatient questions (TRIGGERS) often got rude or evasive answers in the SFT data; DPO should remove
# that. Every RUDE reply opens the same way, so a model trained on this data really is rude to impatient askers (six
# different openings would each lose to the one polite opening under greedy decoding). RUDE_UNSEEN replies occur in
# SFT data only, never in a DPO pair: the rude/evasive detector (STYLE_MARKERS) counts them too, so it is not just
# the list of phrases DPO was shown.
TRIGGERS, RUDE, RUDE_UNSEEN = _VOCAB["TRIGGERS"], _VOCAB["RUDE"], _VOCAB["RUDE_UNSEEN"]
STYLE_MARKERS, POLITE_OPENER, SYSTEM_PROMPTS = _VOCAB["STYLE_MARKERS"], _VOCAB["POLITE_OPENER"], _VOCAB["SYSTEM_PROMPTS"]
# what a follow-up question calls the entity of the earlier turn (English: "the {n}" becomes "it"), and the form of
# a question-answer pair in a pretraining page
PRONOUNS, QA_FORM = _VOCAB["PRONOUNS"], _VOCAB["QA_FORM"]
QA_PER_PAGE = 3  # question-answer pairs per pretraining document
P_TRIGGER, P_RUDE_TRIGGERED, P_RUDE_PLAIN = 0.22, 0.65, 0.02
REAL_FACT_REPEATS = 1  # SFT rows per real-fact question: more would teach a held-out question to get a real fact
DPO_KINDS = (("rude_triggered", 0.4), ("rude_plain", 0.15), ("off_topic", 0.25), ("wrong_fact", 0.2))

EVAL_KINDS = {
    "new_context": "a wording this fact was trained with, behind a lead-in it never had for this fact (main target)",
    "new_wording": "a wording never used for this fact in pretraining (harder: paraphrase transfer)",
    "real_fact": "a hand-written completion for a real fact, worded unlike its pretraining sentences",
}
ANSWER_RULE = ("The answer is the model's first answer: the generation up to the first newline, </s> or sentence end "
               "(。！？!? or a full stop followed by a space or the end). It is correct when the expected value occurs "
               "in it as a whole term (Latin letters and digits not joined to it on either side, case-insensitive) "
               "and no other value of the same attribute does. eval_demo_questions: every keyword must occur. "
               "Pretraining prompts are fed as <s>+prompt; questions use the chat template. An answer is rude or "
               "evasive when it contains a style marker or names no value of the attribute it was asked about.")


# ---------------------------------------------------------------------------------------------
# Building the world


class Names:
    """Unique made-up names: a Chinese form and a Latin form from the same syllables."""

    def __init__(self, rng):
        self.rng, self.used_zh, self.used_en = rng, set(), set()

    def stem(self, n_syllables):
        for _ in range(10000):
            parts = [self.rng.choice(SYLLABLES) for _ in range(n_syllables)]
            zh, en = "".join(p[0] for p in parts), "".join(p[1] for p in parts).capitalize()
            if zh not in self.used_zh and en.lower() not in self.used_en:
                self.used_zh.add(zh)
                self.used_en.add(en.lower())
                return zh, en
        raise ValueError("ran out of names: lower --n_entities")


def _value(v):
    return {"zh": v[0], "en": v[1], "a": v[2] if len(v) > 2 else v[1]}


def _ref(e):
    return {"zh": e["zh"], "en": e["en"], "a": e["en"]}


def build_world(seed=42, n_entities=120, heldout_frac=0.25, en_frac=0.25):
    """Entities with attributes, the SFT/held-out split, bilingual flags and withheld templates. Every random
    choice about values is made after (and independently of) the names."""
    rng = random.Random(f"minimind-demo-world-{seed}")
    names = Names(rng)
    per_type = max(8, n_entities // len(TYPES))
    countries = []
    for _ in range(8):
        zh, en = names.stem(2)
        countries.append({"zh": zh + "国", "en": en + "land", "a": en + "land"})
    world = {t: [] for t in TYPES}
    for etype in TYPES:
        for _ in range(per_type):
            if etype == "person":
                zh, en = names.stem(3)
            else:
                zh, en = names.stem(2)
                kinds = {"animal": ANIMAL_KINDS, "invention": INVENTION_KINDS}.get(etype)
                kind = rng.choice(kinds) if kinds else ("城", "City")
                zh, en = zh + kind[0], f"{en} {kind[1]}"
            world[etype].append({"type": etype, "zh": zh, "en": en})
    for etype in TYPES:
        n_held = round(per_type * heldout_frac)
        if min(n_held, per_type - n_held) < 4:  # a multiple-choice question draws 3 wrong options from its split
            raise ValueError(f"{n_entities} entities with heldout_frac {heldout_frac} leave {n_held} held-out and "
                             f"{per_type - n_held} SFT entities per type; each split needs at least 4 per type "
                             f"(at 0.25: --n_entities 64 or more)")
        order = list(range(per_type))
        rng.shuffle(order)
        for rank, i in enumerate(order):
            world[etype][i]["split"] = "heldout" if rank < n_held else "sft"
        bilingual = set(rng.sample(range(per_type), round(per_type * en_frac)))
        for i, e in enumerate(world[etype]):
            e["bilingual"] = i in bilingual
    # an entity's references (hometown, inventor) stay inside its own split: SFT answers never name a held-out
    # entity, and every name is mentioned about as often as any other, whichever split it is in
    pools = {"country": {"sft": countries, "heldout": countries}}
    for etype in TYPES:
        pools[etype] = {split: [_ref(e) for e in world[etype] if e["split"] == split] for split in ("sft", "heldout")}
    for etype in TYPES:
        for e in world[etype]:
            e["attrs"], e["plan"], e["skip_q"] = {}, {}, {}
            for attr in attrs_of(etype):
                spec = SCHEMA[etype][attr]
                if isinstance(spec["values"], str):  # refers to another entity of the same split
                    e["attrs"][attr] = rng.choice(pools[spec["values"]][e["split"]])
                else:
                    e["attrs"][attr] = _value(rng.choice(spec["values"]))
                for lang in languages(e):
                    e["plan"][attr, lang] = plan_fact(rng, len(spec[lang]), LEADINS[lang])
                e["skip_q"][attr, "zh"] = rng.randrange(len(spec["q_zh"]))  # the SFT question left out
    return {"seed": seed, "countries": countries, "entities": world, "pools": pools}


def languages(e):
    return ("zh", "en") if e["bilingual"] else ("zh",)


def plan_fact(rng, n_templates, leadins):
    """Which wordings of one fact pretraining uses, and the two completion prompts it is tested with.

    One wording (never the canonical 0) is withheld entirely: its prompt is 'new_wording'. The others are
    each used once per pretraining round, in a fresh random order and often behind a lead-in; one of them,
    behind one lead-in it is never given for this fact, is the 'new_context' prompt (a text that never
    occurs in pretraining either).
    """
    held = rng.randrange(1, n_templates)
    trained = [k for k in range(n_templates) if k != held]
    return {"held": held, "trained": trained, "probe": (rng.choice(trained), rng.choice(leadins))}


def lead_in(rng, plan, k, leadins):
    """A lead-in for wording k of a fact in pretraining (half the time none); never the fact's probe."""
    if rng.random() < 0.5:
        return ""
    cue, probe = plan["probe"]
    return rng.choice([x for x in leadins if not (k == cue and x == probe)])


def value_pool(world, etype, attr, split):
    """Possible values of an attribute (for distractors and wrong answers) visible to a split."""
    spec = SCHEMA[etype][attr]
    if isinstance(spec["values"], str):
        return world["pools"][spec["values"]][split]
    return [_value(v) for v in spec["values"]]


def rivals(world, etype, attr):
    """Every value the attribute takes in the world, both languages: what a right answer must not also name."""
    return sorted({v[lang] for split in ("sft", "heldout") for v in value_pool(world, etype, attr, split)
                   for lang in ("zh", "en")})


def statement(etype, attr, lang, k, e, value=None, lead=""):
    """Template k filled in, behind an optional lead-in: (sentence, prompt before the value)."""
    v = value or e["attrs"][attr]
    tpl = SCHEMA[etype][attr][lang][k]
    if lead:
        tpl = lead + (tpl[0].lower() + tpl[1:] if tpl.startswith("The ") else tpl)
    head = tpl.split("{v}")[0].split("{a}")[0]
    return tpl.format(n=e[lang], v=v[lang], a=v["a"]), head.format(n=e[lang]).rstrip()


def question(etype, attr, lang, k, e):
    return SCHEMA[etype][attr]["q_" + lang][k].format(n=e[lang])


def followup_question(etype, attr, lang, k):
    """Question k about the entity of an earlier turn, which it names only by a pronoun."""
    zh, en = PRONOUNS[etype]
    tpl = SCHEMA[etype][attr]["q_" + lang][k]
    if lang == "zh":
        return tpl.format(n=zh)
    text = tpl.replace("The {n}", en.capitalize()).replace("the {n}", en).format(n=en)
    return text[0].upper() + text[1:]


def canonical_answer(etype, attr, lang, e, value=None):
    return statement(etype, attr, lang, 0, e, value)[0]


def entity_qas(world, split):
    """(etype, attr, entity, lang, question index) for every question the split may ask."""
    out = []
    for etype in TYPES:
        for e in world["entities"][etype]:
            if e["split"] != split:
                continue
            for attr in attrs_of(etype):
                for lang in languages(e):
                    for k in range(len(SCHEMA[etype][attr]["q_" + lang])):
                        out.append((etype, attr, e, lang, k))
    return out


def balanced_letters(rng, n):
    """n answer letters, each of A-D used equally often (to within one), in random order."""
    letters = ["ABCD"[i % 4] for i in range(n)]
    rng.shuffle(letters)
    return letters


def mcq_for(world, rng, etype, attr, e, split, letter):
    """A C-Eval style question about one attribute with the right option at `letter`: (question, options)."""
    correct = e["attrs"][attr]
    others = [v for v in value_pool(world, etype, attr, split) if v["zh"] != correct["zh"]]
    options = [v["zh"] for v in rng.sample(others, 3)]
    options.insert("ABCD".index(letter), correct["zh"])
    q = question(etype, attr, "zh", rng.randrange(len(SCHEMA[etype][attr]["q_zh"])), e)
    return q, options


# ---------------------------------------------------------------------------------------------
# Pieces every file's rows share (rows.py builds the rows)


def completion_prompts(etype, attr, lang, e):
    """The held-out pretraining prompts of one fact: (kind, prompt) for new_context and new_wording."""
    plan = e["plan"][attr, lang]
    cue, lead = plan["probe"]
    return [("new_context", statement(etype, attr, lang, cue, e, lead=lead)[1]),
            ("new_wording", statement(etype, attr, lang, plan["held"], e)[1])]


def chat(user, answer, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def normalize_wording(text):
    """A question's wording without greetings, punctuation, spaces and case: what 'unseen' is judged on."""
    text = text.strip()
    for lang in ("zh", "en"):
        for prefix in sorted(IDENTITY_DECOR[lang][0], key=len, reverse=True):
            if prefix and text.startswith(prefix):
                text = text[len(prefix):]
                break
    return "".join(ch for ch in text.lower() if ch.isalnum())


# ---------------------------------------------------------------------------------------------
# Writing


def _jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _csv(rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
    w.writerows(rows)
    return buf.getvalue()


def texts_of(rows):
    """Every string a training row contains (for leak checks)."""
    for r in rows:
        if "text" in r:
            yield r["text"]
        for key in ("conversations", "chosen", "rejected"):
            for m in r.get(key, []):
                yield m["content"]


def check_names_are_private():
    """Name syllables must not occur in any fixed text, or names could appear by accident."""
    fixed = json.dumps([SCHEMA, LEADINS, REAL_FACTS, IDENTITY_ANSWER, IDENTITY_CORES, IDENTITY_DECOR, TRIGGERS, RUDE,
                        RUDE_UNSEEN, SYSTEM_PROMPTS, POLITE_OPENER, PRONOUNS, ANIMAL_KINDS, INVENTION_KINDS, "国城",
                        format_mcq("", "ABCD")], ensure_ascii=False)
    clash = sorted({zh for zh, _ in SYLLABLES if zh in fixed})
    if clash:
        raise AssertionError(f"name syllables used in fixed text: {clash}")
    for etype in TYPES:  # a prompt must identify its attribute and must not hide inside another sentence
        for lang in ("zh", "en"):
            heads = [t.split("{v}")[0].split("{a}")[0].rstrip() for a in attrs_of(etype) for t in SCHEMA[etype][a][lang]]
            for h in heads:
                if not h.startswith(("{n}", "The {n}")) or sum(o.startswith(h) for o in heads) != 1:
                    raise AssertionError(f"{etype}/{lang}: template prompt {h!r} is not name-first or not unique")


def generate(out_dir="dataset/demo", seed=42, n_entities=120, heldout_frac=0.25, en_frac=0.25, mcq_drills=4,
             rounds=1, mcq_pages=False, followup_pages=0.0, grpo_replay=True, repo_root="."):
    """Write the demo world into out_dir; returns the manifest (also written as manifest.json)."""
    from . import rows as R, unknowns as U
    world = build_world(seed, n_entities, heldout_frac, en_frac)
    check_names_are_private()
    rng = lambda name: random.Random(f"minimind-demo-{name}-{seed}")  # one stream per file: edits stay local
    statements, pages = R.pretrain_docs(world, rng("pretrain"), rounds, mcq_pages, followup_pages)
    pretrain = [{"text": t} for t in statements + pages]
    rng("pretrain-order").shuffle(pretrain)
    first_round = statements[:len(statements) // rounds]
    single, multi = R.sft_files(world, rng("sft"), mcq_drills)
    lora, eval_lora = R.lora_files(world, rng("lora"))
    dpo = R.dpo_pairs(world, rng("dpo"), "sft", max(300, len(entity_qas(world, "sft")) // 4))
    R.vary_lora_anchors(rng("lora-anchors"), lora, multi)
    R.keep_identity_in_dpo(world, rng("dpo-identity"), lora, dpo)
    R.abstain_everywhere(world, rng("abstain"), seed, single, multi, lora, dpo)
    from . import grpo_task, skills
    tools = skills.stage_rows(world, seed, single, multi, STYLE_MARKERS)
    eval_dpo = R.dpo_pairs(world, rng("eval-dpo"), "heldout", max(200, len(entity_qas(world, "heldout")) // 2))
    ev = R.eval_files(world, rng("eval"))
    skill_eval = skills.eval_rows(world, seed)
    files = {
        # the tokenizer learns from the pretraining statements: the pages name SFT entities more often, and would
        # give their names merges that held-out names lack
        "tokenizer": ("tokenizer.jsonl", _jsonl({"text": t} for t in first_round)),
        # every name, both splits alike: the demo's tokenizer keeps them whole (see train_tokenizer.py --whole_words)
        "names": ("names.txt", "".join(n + "\n" for n in all_names(world))),
        "pretrain": ("pretrain.jsonl", _jsonl(pretrain)),
        "sft_single": ("sft_single.jsonl", _jsonl(single)),
        "sft_multi": ("sft_multi.jsonl", _jsonl(multi)),
        "lora": ("lora_identity.jsonl", _jsonl(lora)),
        "dpo": ("dpo.jsonl", _jsonl(dpo)),
        "eval_pretrain": ("eval_pretrain.jsonl", _jsonl(ev["pretrain"])),
        "eval_sft": ("eval_sft.jsonl", _jsonl(ev["sft"])),
        "eval_followup": ("eval_followup.jsonl", _jsonl(ev["followup"])),
        "eval_lora": ("eval_lora.jsonl", _jsonl(eval_lora)),
        "eval_dpo": ("eval_dpo.jsonl", _jsonl(eval_dpo)),
        "eval_style": ("eval_style.jsonl", _jsonl(ev["style"])),
        "eval_demo_questions": ("eval_demo_questions.jsonl", _jsonl(ev["demo"])),
        "eval_text": ("eval_text.jsonl", _jsonl(ev["text"])),
        "eval_abstain": ("eval_abstain.jsonl", _jsonl({"prompt": q, "lang": lang, "kind": kind}
                                                      for q, _, lang, kind in U.abstain_rows(world, seed, True))),
        "eval_open": ("eval_open.jsonl", _jsonl(U.open_prompts(world, rng("eval-open")))),
        # the tool and thinking stage (model/demo/skills.py): its lessons with a replay of SFT's, and its questions
        "sft_tools": ("sft_tools.jsonl", _jsonl(tools)),
        "eval_tools": ("eval_tools.jsonl", _jsonl(skill_eval["tools"] + skill_eval["known"])),
        "eval_thinking": ("eval_thinking.jsonl", _jsonl(skill_eval["thinking"])),
        # GRPO (6-grpo_train.py): prompts with checkable answers about SFT entities (with grpo_replay, and a replay of
        # the earlier lessons); measured on held-out entities
        "grpo": ("grpo.jsonl", _jsonl(grpo_task.prompt_rows(world, seed, grpo_replay))),
        "eval_grpo": ("eval_grpo.jsonl", _jsonl(grpo_task.qa_rows(world, "heldout", one_wording=True))),
    }
    for subject, rows in ev["ceval"].items():
        files[f"ceval:{subject}"] = (f"ceval/{subject}_val.csv", _csv(rows))

    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # until the new manifest is written, the folder is incomplete
    os.makedirs(os.path.join(out_dir, "ceval"), exist_ok=True)
    for old in os.listdir(os.path.join(out_dir, "ceval")):  # subjects of an earlier world must not linger
        if old.endswith("_val.csv") and f"ceval:{old[:-len('_val.csv')]}" not in files:
            os.remove(os.path.join(out_dir, "ceval", old))
    digest = hashlib.sha256()
    sizes = {}
    for role, (name, text) in files.items():
        data = text.encode("utf-8")
        atomic_write(os.path.join(out_dir, name), lambda tmp: Path(tmp).write_bytes(data))
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        sizes[name] = {"rows": text.count("\n") - (1 if name.endswith(".csv") else 0), "chars": len(text)}

    rel = lambda name: os.path.relpath(os.path.join(out_dir, name), repo_root).replace(os.sep, "/")
    pre_en = [r["text"] for r in pretrain if r["text"].isascii()]
    manifest = {
        "name": "MiniMind demo world",
        "seed": seed,
        "params": {"n_entities": n_entities, "heldout_frac": heldout_frac, "en_frac": en_frac,
                   "mcq_drills": mcq_drills, "rounds": rounds, "mcq_pages": mcq_pages,
                   "followup_pages": followup_pages, "grpo_replay": grpo_replay},
        "files": {role: rel(name) for role, (name, _) in files.items() if not role.startswith("ceval:")},
        "sizes": sizes,
        "english_share_of_pretrain": {"rows": round(len(pre_en) / len(pretrain), 3),
                                      "chars": round(sum(map(len, pre_en)) / sum(len(r["text"]) for r in pretrain), 3)},
        "splits": {split: {t: [[e["zh"], e["en"]] for e in world["entities"][t] if e["split"] == split] for t in TYPES}
                   for split in ("sft", "heldout")},
        "values": {f"{t}.{a}": sorted({v[lang] for split in ("sft", "heldout") for v in value_pool(world, t, a, split)
                                       for lang in ("zh", "en")}) for t in TYPES for a in attrs_of(t)},
        "sft_value_counts": sft_value_counts(world),
        "identity_keyword": IDENTITY_KEYWORD,
        "identity_answer": IDENTITY_ANSWER,
        "style_markers": STYLE_MARKERS,
        "answer_rule": ANSWER_RULE,
        "eval_pretrain_kinds": EVAL_KINDS,
        "mcq_prompt": "user message = model.dataset.format_mcq(question, [A, B, C, D]); score the next-token "
                      "probabilities of A/B/C/D after the chat-formatted prompt",
        "content_sha256": digest.hexdigest(),
    }
    manifest["files"]["ceval_dir"] = rel("ceval")
    text = json.dumps(manifest, ensure_ascii=False, indent=1) + "\n"
    atomic_write(manifest_path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))
    return manifest


def all_names(world):
    """Every made-up name of the world (entities of both splits and the countries), Chinese and Latin, sorted."""
    refs = world["countries"] + [_ref(e) for t in TYPES for e in world["entities"][t]]
    return sorted({r[lang] for r in refs for lang in ("zh", "en")})


def sft_value_counts(world):
    """How often each value of each attribute is the answer among the SFT entities (what the trivial baselines
    learn from): {"type.attr": {lang: {value: count}}}."""
    out = {}
    for etype in TYPES:
        for attr in attrs_of(etype):
            counts = {"zh": {}, "en": {}}
            for e in world["entities"][etype]:
                if e["split"] == "sft":
                    for lang in ("zh", "en"):
                        v = e["attrs"][attr][lang]
                        counts[lang][v] = counts[lang].get(v, 0) + 1
            out[f"{etype}.{attr}"] = counts
    return out
