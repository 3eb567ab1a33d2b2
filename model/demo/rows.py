"""The rows of the demo files: pretraining text, SFT chats, LoRA and DPO sets with abstentions, evaluation prompts."""

from ..dataset import format_mcq
from .world import (DPO_KINDS, IDENTITY_ANSWER, IDENTITY_CORES, IDENTITY_DECOR, IDENTITY_DECOR_SHARE, IDENTITY_EVAL_ONLY,
                    IDENTITY_KEYWORD, LEADINS, P_RUDE_PLAIN, P_RUDE_TRIGGERED, P_TRIGGER, POLITE_OPENER, QA_FORM,
                    QA_PER_PAGE, REAL_FACT_REPEATS, REAL_FACTS, RUDE, RUDE_UNSEEN, SCHEMA, SYSTEM_PROMPTS, TRIGGERS,
                    TYPES, attrs_of, balanced_letters, canonical_answer, chat, completion_prompts, entity_qas,
                    followup_question, languages, lead_in, mcq_for, normalize_wording, question, statement, value_pool)


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
