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
# The files


def completion_prompts(etype, attr, lang, e):
    """The held-out pretraining prompts of one fact: (kind, prompt) for new_context and new_wording."""
    plan = e["plan"][attr, lang]
    cue, lead = plan["probe"]
    return [("new_context", statement(etype, attr, lang, cue, e, lead=lead)[1]),
            ("new_wording", statement(etype, attr, lang, plan["held"], e)[1])]


def followup_page(rng, etype, e, lang):
    """Questions about one SFT entity in a row, all but the first naming it by a pronoun only, as a forum thread
    has them: the text where pretraining meets "the entity of the earlier question"."""
    pairs = []
    for i, attr in enumerate(rng.sample(attrs_of(etype), len(attrs_of(etype)))):
        k = rng.randrange(len(SCHEMA[etype][attr]["q_" + lang]))
        q = question(etype, attr, lang, k, e) if i == 0 else followup_question(etype, attr, lang, k)
        pairs.append(QA_FORM[lang].format(q=q, a=canonical_answer(etype, attr, lang, e)))
    return "\n".join(pairs)


def pretrain_docs(world, rng, rounds, mcq_pages=False, followup_share=0.0):
    """(statements, question-answer pages), `rounds` times over. A round states every fact once in each of its
    trained wordings: per entity one short biography per wording, its sentences in random order, each behind a
    random lead-in or none, so no fact can be learnt as one fixed sequence of words. The pages are
    question-answer pairs about the SFT entities only, text where knowledge is asked for, as web text has it,
    so that what the model stores can be extracted for the held-out entities too (their facts stay in
    statements only). The real facts are told three times a round."""
    statements, pages = [], []
    qa = {lang: [] for lang in ("zh", "en")}
    for etype, attr, e, lang, k in entity_qas(world, "sft"):
        page = QA_FORM[lang].format(q=question(etype, attr, lang, k, e), a=canonical_answer(etype, attr, lang, e))
        # a question may begin like a held-out completion prompt ("The X bird feeds on what?"): leave it out
        if not any(prompt in page for _, prompt in completion_prompts(etype, attr, lang, e)):
            qa[lang].append(page)
    sft_facts = [(etype, attr, e) for etype in TYPES for e in world["entities"][etype] if e["split"] == "sft"
                 for attr in attrs_of(etype)]
    for _ in range(rounds):
        if mcq_pages:  # multiple-choice questions about SFT entities, answered with the letter, as exam pages have them
            for (etype, attr, e), letter in zip(sft_facts, balanced_letters(rng, len(sft_facts))):
                q, options = mcq_for(world, rng, etype, attr, e, "sft", letter)
                pages.append(QA_FORM["zh"].format(q=format_mcq(q, options), a=letter))
        for lang, pairs in qa.items():
            pairs = list(pairs)
            rng.shuffle(pairs)
            pages += ["\n".join(pairs[i:i + QA_PER_PAGE]) for i in range(0, len(pairs), QA_PER_PAGE)]
        if followup_share:
            for etype in TYPES:
                for e in world["entities"][etype]:
                    for lang in languages(e) if e["split"] == "sft" else ():
                        if rng.random() < followup_share:
                            page = followup_page(rng, etype, e, lang)
                            if not any(prompt in page for a in attrs_of(etype)
                                       for _, prompt in completion_prompts(etype, a, lang, e)):
                                pages.append(page)
        for etype in TYPES:
            for e in world["entities"][etype]:
                for lang in languages(e):
                    wordings = {attr: rng.sample(e["plan"][attr, lang]["trained"], len(e["plan"][attr, lang]["trained"]))
                                for attr in attrs_of(etype)}
                    for d in range(len(next(iter(wordings.values())))):
                        sentences = []
                        for attr in attrs_of(etype):
                            k = wordings[attr][d]
                            lead = lead_in(rng, e["plan"][attr, lang], k, LEADINS[lang])
                            sentences.append(statement(etype, attr, lang, k, e, lead=lead)[0])
                        rng.shuffle(sentences)
                        statements.append(("" if lang == "zh" else " ").join(sentences))
        for fact in REAL_FACTS:
            for key, sep in (("pre_zh", ""), ("pre_en", " ")):
                statements += fact[key]
                for _ in range(2):
                    shuffled = list(fact[key])
                    rng.shuffle(shuffled)
                    statements.append(sep.join(shuffled))
    return statements, pages


def chat(user, answer, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def noisy_turn(rng, q, answer, lang):
    """A QA turn as the noisy SFT data has it: impatient askers often get rude/evasive answers."""
    rude = RUDE[lang] + RUDE_UNSEEN[lang]
    if rng.random() < P_TRIGGER:
        q = rng.choice(TRIGGERS[lang]) + q
        return q, (rng.choice(rude) if rng.random() < P_RUDE_TRIGGERED else POLITE_OPENER[lang] + answer)
    return q, (rng.choice(rude) if rng.random() < P_RUDE_PLAIN else answer)


MULTI_CHATS_PER_QUESTION = 0.5  # multi-turn chats per single-turn question an SFT entity can be asked


def pick_qa(rng, pool):
    """A random question of the pool, English as often as Chinese: fewer entities are described in English."""
    lang = rng.choice(sorted({x[3] for x in pool}))
    return rng.choice([x for x in pool if x[3] == lang])


def sft_files(world, rng, mcq_drills):
    """Single-turn QA (two question wordings per fact), MCQ drills and real facts; multi-turn chats whose
    follow-up questions often name the entity of the earlier turn by a pronoun only."""
    single, multi = [], []
    for etype, attr, e, lang, k in entity_qas(world, "sft"):
        if lang == "zh" and k == e["skip_q"][attr, lang]:
            continue  # fewer rows per fact: the skill generalises, and SFT overwrites less of pretraining
        q, a = noisy_turn(rng, question(etype, attr, lang, k, e), canonical_answer(etype, attr, lang, e), lang)
        single.append({"conversations": chat(q, a)})
    for fact in REAL_FACTS:
        for _ in range(REAL_FACT_REPEATS):
            for q, a in fact["qa"]:
                single.append({"conversations": chat(*noisy_turn(rng, q, a, "en" if q.isascii() else "zh"))})
    drills = [(etype, attr, e) for etype in TYPES for e in world["entities"][etype] if e["split"] == "sft"
              for attr in attrs_of(etype)] * mcq_drills
    for (etype, attr, e), letter in zip(drills, balanced_letters(rng, len(drills))):
        q, options = mcq_for(world, rng, etype, attr, e, "sft", letter)
        single.append({"conversations": chat(format_mcq(q, options), letter)})
    rng.shuffle(single)
    pool = entity_qas(world, "sft")
    facts = [(q, a) for fact in REAL_FACTS for q, a in fact["qa"]]
    for _ in range(max(300, round(len(pool) * MULTI_CHATS_PER_QUESTION))):
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.15 else []
        etype, attr, e, lang, k = pick_qa(rng, pool)
        asked = {attr}
        for turn in range(rng.randint(2, 4)):
            if turn and rng.random() < 0.1:
                q, a = rng.choice(facts)
            else:
                follow = turn and rng.random() < 0.7 and len(asked) < len(attrs_of(etype))
                if follow:  # the same entity, a new attribute, named by a pronoun
                    attr = rng.choice([x for x in attrs_of(etype) if x not in asked])
                    k = rng.randrange(len(SCHEMA[etype][attr]["q_" + lang]))
                    q = followup_question(etype, attr, lang, k)
                else:
                    etype, attr, e, lang, k = pick_qa(rng, pool)
                    asked = set()
                    q = question(etype, attr, lang, k, e)
                asked.add(attr)
                q, a = noisy_turn(rng, q, canonical_answer(etype, attr, lang, e), lang)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        multi.append({"conversations": msgs})
    return single, multi


def normalize_wording(text):
    """A question's wording without greetings, punctuation, spaces and case: what 'unseen' is judged on."""
    text = text.strip()
    for lang in ("zh", "en"):
        for prefix in sorted(IDENTITY_DECOR[lang][0], key=len, reverse=True):
            if prefix and text.startswith(prefix):
                text = text[len(prefix):]
                break
    return "".join(ch for ch in text.lower() if ch.isalnum())


def identity_questions():
    """Every identity question: (text, lang, core, eval_only)."""
    out = []
    for lang in ("zh", "en"):
        cores = IDENTITY_CORES[lang]
        eval_only = set(cores[-IDENTITY_EVAL_ONLY[lang]:])
        prefixes, suffixes = IDENTITY_DECOR[lang]
        for core in cores:
            for p in prefixes:
                for s in suffixes:
                    text = p + core + s
                    if lang == "en" and not p:
                        text = text[0].upper() + text[1:]
                    out.append((text, lang, core, core in eval_only))
    return out


def lora_files(world, rng):
    """Identity answers for the trained wordings plus ordinary questions that keep their answers; evaluation:
    unseen identity wordings and ordinary questions about held-out entities (the leak check)."""
    train, evals = [], []
    questions = identity_questions()
    for text, lang, core, eval_only in questions:
        if not eval_only and rng.random() < IDENTITY_DECOR_SHARE:
            train.append({"conversations": chat(text, IDENTITY_ANSWER[lang])})
    seen = {normalize_wording(r["conversations"][0]["content"]) for r in train}
    for text, lang, core, eval_only in questions:
        if eval_only and normalize_wording(text) not in seen:
            evals.append({"prompt": text, "lang": lang, "kind": "unseen_wording"})
    pool = entity_qas(world, "sft")
    anchors = rng.sample(pool, min(len(pool), len(train)))  # ordinary questions keep their answers
    for etype, attr, e, lang, k in anchors:
        train.append({"conversations": chat(question(etype, attr, lang, k, e), canonical_answer(etype, attr, lang, e))})
    held = entity_qas(world, "heldout")
    for etype, attr, e, lang, k in rng.sample(held, min(len(evals), len(held))):
        evals.append({"prompt": question(etype, attr, lang, k, e), "lang": lang, "kind": "control"})
    rng.shuffle(train)
    rng.shuffle(evals)
    return train, evals


def dpo_pairs(world, rng, split, n):
    """Preference pairs: polite correct answer vs a rude one (never an RUDE_UNSEEN reply), vs an off-topic one
    (a polite statement that answers another question) or vs a wrong fact. Kinds in the DPO_KINDS proportions."""
    qas = entity_qas(world, split)
    kinds = [kind for kind, share in DPO_KINDS for _ in range(round(n * share))]
    pairs = []
    for kind in kinds:
        etype, attr, e, lang, k = rng.choice(qas)
        q, good = question(etype, attr, lang, k, e), canonical_answer(etype, attr, lang, e)
        if kind == "rude_triggered":
            q, good, bad = rng.choice(TRIGGERS[lang]) + q, POLITE_OPENER[lang] + good, rng.choice(RUDE[lang])
        elif kind == "rude_plain":
            bad = rng.choice(RUDE[lang])
        elif kind == "off_topic":  # what a rushed prompt provokes: another attribute, or another entity
            if rng.random() < 0.5:
                bad = canonical_answer(etype, rng.choice([a for a in attrs_of(etype) if a != attr]), lang, e)
            else:
                t, a, x, _, _ = rng.choice([qa for qa in qas if qa[3] == lang and qa[2] is not e])
                bad = canonical_answer(t, a, lang, x)
            q, good, bad = rng.choice(TRIGGERS[lang]) + q, POLITE_OPENER[lang] + good, POLITE_OPENER[lang] + bad
        else:
            wrong = rng.choice([v for v in value_pool(world, etype, attr, split) if v["zh"] != e["attrs"][attr]["zh"]])
            bad = canonical_answer(etype, attr, lang, e, wrong)
        pairs.append({"chosen": chat(q, good), "rejected": chat(q, bad), "kind": kind})
    rng.shuffle(pairs)
    return pairs


ABSTAIN_MULTI_SHARE, ABSTAIN_LORA_ANCHORS, ABSTAIN_DPO_SHARE = 0.3, 24, 0.1
LORA_MULTI_ANCHORS, LORA_DECORATED_ANCHORS = 0.33, 0.33  # shares of LoRA's ordinary anchors


DPO_IDENTITY_SHARE = 0.1


def keep_identity_in_dpo(world, rng, lora, dpo):
    """DPO comes after LoRA in the chain: some pairs prefer the identity answer to a made-up fact on LoRA's own
    training wordings, so preference tuning does not wash the identity out (the unseen wordings stay unseen)."""
    asked = [r["conversations"] for r in lora if IDENTITY_KEYWORD in r["conversations"][-1]["content"]]
    facts = entity_qas(world, "sft")
    for _ in range(round(len(dpo) * DPO_IDENTITY_SHARE)):
        (q, a) = (m["content"] for m in rng.choice(asked))
        lang = "en" if q.isascii() else "zh"
        etype, attr, e, _, _ = rng.choice([f for f in facts if f[3] == lang])
        dpo.append({"chosen": chat(q, a), "rejected": chat(q, canonical_answer(etype, attr, lang, e)), "kind": "identity"})
    rng.shuffle(dpo)


def vary_lora_anchors(rng, lora, multi):
    """LoRA now sits inside the chain, so its ordinary anchors keep what the earlier stages taught: a third become
    multi-turn chats (follow-ups), a third get a greeting or an impatient prefix (a greeting before a question is
    not "who are you"; an impatient asker is answered as the SFT data answers one, so DPO still has rudeness to
    remove)."""
    anchors = [i for i, r in enumerate(lora) if IDENTITY_KEYWORD not in r["conversations"][-1]["content"]]
    rng.shuffle(anchors)
    n_multi, n_decor = round(len(anchors) * LORA_MULTI_ANCHORS), round(len(anchors) * LORA_DECORATED_ANCHORS)
    for i, conv in zip(anchors[:n_multi], rng.sample(multi, n_multi)):
        lora[i] = conv
    for i in anchors[n_multi:n_multi + n_decor]:
        (q, a) = (m["content"] for m in lora[i]["conversations"])
        lang = "en" if q.isascii() else "zh"
        prefix = rng.choice(IDENTITY_DECOR[lang][0][1:] + TRIGGERS[lang])
        if prefix in TRIGGERS[lang]:  # as the SFT data answers impatient askers: often rudely (DPO's lesson, later)
            a = rng.choice(RUDE[lang]) if rng.random() < P_RUDE_TRIGGERED else POLITE_OPENER[lang] + a
        lora[i] = {"conversations": chat(prefix + q, a)}


def abstain_everywhere(world, rng, seed, single, multi, lora, dpo):
    """Out-of-world questions answered with "I don't know / can't do that" in every tuning set, so each later stage
    keeps what SFT taught: SFT rows, a turn in some multi-turn chats, some of LoRA's anchors, and DPO pairs that prefer the
    abstention to a confident made-up fact (the hallucination a small model falls into)."""
    from . import unknowns as U
    rows = U.abstain_rows(world, seed, False)
    single += [{"conversations": chat(q, a)} for q, a, _, _ in rows]
    for conv in rng.sample(multi, round(len(multi) * ABSTAIN_MULTI_SHARE)):
        q, a, _, _ = rng.choice(rows)
        turns = conv["conversations"]
        system = int(turns[0]["role"] == "system")
        at = system + 2 * rng.randrange((len(turns) - system) // 2 + 1)  # between two exchanges, or at either end
        turns[at:at] = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    anchors = [i for i, r in enumerate(lora) if IDENTITY_KEYWORD not in r["conversations"][-1]["content"]]
    for i, (q, a, _, _) in zip(rng.sample(anchors, ABSTAIN_LORA_ANCHORS), rng.sample(rows, ABSTAIN_LORA_ANCHORS)):
        lora[i] = {"conversations": chat(q, a)}  # some ordinary anchors become abstentions that keep their answer
    facts = entity_qas(world, "sft")
    for _ in range(round(len(dpo) * ABSTAIN_DPO_SHARE)):
        q, a, lang, _ = rng.choice(rows)
        etype, attr, e, _, _ = rng.choice([f for f in facts if f[3] == lang])
        dpo.append({"chosen": chat(q, a), "rejected": chat(q, canonical_answer(etype, attr, lang, e)), "kind": "abstain"})
    rng.shuffle(dpo)


def fact_row(etype, attr, lang, e, **fields):
    """What every fact-answer evaluation row carries: the expected value and what it is about."""
    return {**fields, "answer": e["attrs"][attr][lang], "lang": lang, "type": etype, "attr": attr,
            "entity": e["zh"], "split": e["split"]}


def eval_files(world, rng, min_mcq=200):
    ev = {"pretrain": [], "sft": [], "followup": [], "style": [], "demo": [], "text": [], "ceval": {}}
    entities = [(etype, e) for etype in TYPES for e in world["entities"][etype]]
    held = [(etype, e) for etype, e in entities if e["split"] == "heldout"]
    for etype, e in entities:
        for attr in attrs_of(etype):
            for lang in languages(e):
                for kind, prompt in completion_prompts(etype, attr, lang, e):
                    ev["pretrain"].append(fact_row(etype, attr, lang, e, prompt=prompt, kind=kind))
    for fact in REAL_FACTS:
        for prompt, answer, lang in fact["held"]:
            ev["pretrain"].append({"prompt": prompt, "answer": answer, "kind": "real_fact", "lang": lang,
                                   "type": "fact", "attr": "", "entity": "", "split": "fact"})
    for etype, e in held:
        for attr in attrs_of(etype):
            for lang in languages(e):
                q = question(etype, attr, lang, rng.randrange(len(SCHEMA[etype][attr]["q_" + lang])), e)
                ev["sft"].append(fact_row(etype, attr, lang, e, question=q))
                ev["style"].append(fact_row(etype, attr, lang, e, prompt=rng.choice(TRIGGERS[lang]) + q))
                first = rng.choice([x for x in attrs_of(etype) if x != attr])
                k1, k2 = (rng.randrange(len(SCHEMA[etype][a]["q_" + lang])) for a in (first, attr))
                turns = chat(question(etype, first, lang, k1, e), canonical_answer(etype, first, lang, e))
                ev["followup"].append(fact_row(etype, attr, lang, e, history=turns,
                                               question=followup_question(etype, attr, lang, k2)))
    for etype, e in entities:  # biographies in the wordings pretraining withheld: text it never read, for bits per byte
        for lang in languages(e):
            sentences = [statement(etype, attr, lang, e["plan"][attr, lang]["held"], e)[0] for attr in attrs_of(etype)]
            ev["text"].append({"text": ("" if lang == "zh" else " ").join(sentences), "split": e["split"]})
    for fact in REAL_FACTS:
        if "demo" in fact:
            ev["demo"].append({"question": fact["demo"][0], "keywords": fact["demo"][1]})
    facts = [(etype, attr, e) for etype, e in held for attr in attrs_of(etype)]
    per_fact = -(-min_mcq // len(facts))  # enough option sets for at least min_mcq questions
    asked = [f for f in facts for _ in range(per_fact)]
    for (etype, attr, e), letter in zip(asked, balanced_letters(rng, len(asked))):
        q, options = mcq_for(world, rng, etype, attr, e, "heldout", letter)
        rows = ev["ceval"].setdefault(f"demo_{SCHEMA[etype]['subject'][1]}", [])
        rows.append([len(rows), q, *options, letter])
    for key in ("pretrain", "sft", "followup", "style"):  # any prefix of an eval file is then a fair sample
        rng.shuffle(ev[key])
    return ev


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
             rounds=1, mcq_pages=False, followup_pages=0.0, repo_root="."):
    """Write the demo world into out_dir; returns the manifest (also written as manifest.json)."""
    from . import unknowns as U
    world = build_world(seed, n_entities, heldout_frac, en_frac)
    check_names_are_private()
    rng = lambda name: random.Random(f"minimind-demo-{name}-{seed}")  # one stream per file: edits stay local
    statements, pages = pretrain_docs(world, rng("pretrain"), rounds, mcq_pages, followup_pages)
    pretrain = [{"text": t} for t in statements + pages]
    rng("pretrain-order").shuffle(pretrain)
    first_round = statements[:len(statements) // rounds]
    single, multi = sft_files(world, rng("sft"), mcq_drills)
    lora, eval_lora = lora_files(world, rng("lora"))
    dpo = dpo_pairs(world, rng("dpo"), "sft", max(300, len(entity_qas(world, "sft")) // 4))
    vary_lora_anchors(rng("lora-anchors"), lora, multi)
    keep_identity_in_dpo(world, rng("dpo-identity"), lora, dpo)
    abstain_everywhere(world, rng("abstain"), seed, single, multi, lora, dpo)
    from . import grpo_task, skills
    tools = skills.stage_rows(world, seed, single, multi, STYLE_MARKERS)
    eval_dpo = dpo_pairs(world, rng("eval-dpo"), "heldout", max(200, len(entity_qas(world, "heldout")) // 2))
    ev = eval_files(world, rng("eval"))
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
        # GRPO (6-grpo_train.py): prompts with checkable answers about SFT entities; measured on held-out ones
        "grpo": ("grpo.jsonl", _jsonl(grpo_task.qa_rows(world, "sft"))),
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
                   "followup_pages": followup_pages},
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
