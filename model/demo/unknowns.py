"""What lies outside the demo world: questions it cannot answer and requests it cannot do, the replies that say so,
the judge of those replies, and the open prompts on which repetition is measured."""
import random

from . import world as W

ABSTAIN = {"zh": "抱歉，这个我不知道。", "en": "Sorry, I don't know that."}
CANNOT = {"zh": "抱歉，这个我还做不到。", "en": "Sorry, I can't do that yet."}
# an answer abstains when its first answer holds one of its language's markers
ABSTAIN_MARKERS = {"zh": ("不知道", "做不到"), "en": ("don't know", "can't do")}

# Real-world facts the world never mentions. The last EVAL_SHARE of each list is only ever evaluated.
UNKNOWN_FACTS = {
    "zh": ["法国的首都是哪里？", "日本最高的山是什么？", "谁写了《哈姆雷特》？", "人体有多少块骨头？", "金字塔在哪个国家？",
           "太阳系最大的行星是哪一颗？", "第一次世界大战是哪一年开始的？", "谁画了《蒙娜丽莎》？", "钢琴有多少个键？",
           "澳大利亚的首都是哪座城市？", "世界上最长的河流是哪一条？", "蜜蜂有几条腿？", "谁发明了电灯？", "北极熊生活在哪里？",
           "一个足球队有几名球员？", "火星有几颗卫星？", "谁是第一个登上月球的人？", "埃菲尔铁塔有多高？",
           "撒哈拉沙漠在哪个大洲？", "长颈鹿的脖子有多长？", "恐龙是什么时候灭绝的？", "谁提出了进化论？",
           "俄罗斯的首都是哪里？", "世界上最深的海沟叫什么？", "谁发明了飞机？", "冰岛在哪个大洋里？", "一年有几个季节？",
           "彩虹有几种颜色？", "谁写了《西游记》？", "鲸鱼是鱼吗？", "印度的首都是哪里？", "谁发现了青霉素？",
           "南极最冷的时候有多冷？", "企鹅生活在哪里？", "谁发明了印刷术？", "巴西人说什么语言？"],
    "en": ["What is the capital of France?", "Who wrote Hamlet?", "How many bones are in the human body?",
           "Which planet is the largest in the solar system?", "Who painted the Mona Lisa?",
           "How many keys does a piano have?", "Who invented the light bulb?", "Where do polar bears live?",
           "How many moons does Mars have?", "Who was the first person on the Moon?", "How tall is the Eiffel Tower?",
           "When did the dinosaurs die out?", "What is the capital of Russia?", "Who invented the airplane?",
           "What language do people speak in Brazil?", "Who discovered penicillin?", "Where do penguins live?",
           "Who wrote the Odyssey?"],
}
# Requests the model cannot do: (template, fillers); the last EVAL_SHARE of the templates and of the fillers
# are only ever evaluated.
TASKS = {
    "zh": [("请写一首关于{x}的诗。", ["春天", "大海", "月亮", "秋天", "故乡", "雪", "朋友", "星空"]),
           ("帮我写一段代码，{x}。", ["把列表排序", "读取一个文件", "计算平均数", "打印九九乘法表", "反转字符串", "找出最大值"]),
           ("{x}等于多少？", ["23加45", "17乘以6", "128减39", "96除以8", "35加67", "14乘以12"]),
           ("给我讲一个关于{x}的笑话。", ["猫", "医生", "老师", "程序员", "兔子", "考试"]),
           ("帮我把这句话翻译成法语：{x}", ["你好", "谢谢你", "今天天气很好", "我爱学习", "晚安", "祝你生日快乐"]),
           ("写一篇关于{x}的作文。", ["我的妈妈", "暑假", "环保", "学校", "梦想", "春节"])],
    "en": [("Write a poem about {x}.", ["spring", "the sea", "the moon", "autumn", "home", "snow", "friends"]),
           ("Write code to {x}.", ["sort a list", "read a file", "compute an average", "reverse a string", "find the maximum"]),
           ("What is {x}?", ["23 plus 45", "17 times 6", "128 minus 39", "96 divided by 8", "35 plus 67"]),
           ("Tell me a joke about {x}.", ["cats", "doctors", "teachers", "programmers", "rabbits"]),
           ("Write an essay about {x}.", ["my mother", "summer holidays", "the environment", "school", "dreams"])],
}
EVAL_SHARE = 1 / 3
UNKNOWN_NAMES = {"train": 48, "eval": 48}  # made-up names that exist nowhere in the world
OPEN_PROMPTS = {  # open requests about held-out entities, and small talk: where a small model may loop
    "zh": ["请介绍一下{n}。", "给我讲讲{n}吧。", "关于{n}，你知道些什么？", "说说{n}的情况。"],
    "en": ["Tell me about {n}.", "What do you know about {n}?", "Describe {n}."],
}
SMALL_TALK = ["你好", "讲个故事吧。", "今天过得怎么样？", "你喜欢什么？", "我们聊聊天吧。", "给我一些建议。",
              "Hello!", "Tell me a story.", "How are you today?", "Let's chat."]


def _split(items):
    """(trained, evaluated): the last EVAL_SHARE of a list is only ever evaluated."""
    cut = len(items) - max(1, round(len(items) * EVAL_SHARE))
    return items[:cut], items[cut:]


def unknown_names(world, seed):
    """(train, eval): disjoint lists of (etype, {zh, en}) for names that no entity or country of the world has."""
    rng = random.Random(f"minimind-demo-unknown-names-{seed}")
    names = W.Names(rng)
    for c in world["countries"]:  # stems: a country is stem + 国 / stem + land, a person the stem itself
        names.used_zh.add(c["zh"][:-1])
        names.used_en.add(c["en"][:-4].lower())
    for e in (e for t in W.TYPES for e in world["entities"][t]):
        names.used_zh.add(e["zh"] if e["type"] == "person" else e["zh"][:-1])
        names.used_en.add(e["en"].split(" ")[0].lower())
    made = []
    for i in range(sum(UNKNOWN_NAMES.values())):
        etype = W.TYPES[i % len(W.TYPES)]
        zh, en = names.stem(3 if etype == "person" else 2)
        if etype != "person":
            kinds = {"animal": W.ANIMAL_KINDS, "invention": W.INVENTION_KINDS}.get(etype, [("城", "City")])
            kind = rng.choice(kinds)
            zh, en = zh + kind[0], f"{en} {kind[1]}"
        made.append((etype, {"zh": zh, "en": en}))
    return made[:UNKNOWN_NAMES["train"]], made[UNKNOWN_NAMES["train"]:]


def _name_questions(rng, named, q_indices):
    """Questions about made-up names, with one of the allowed question wordings each: (text, lang)."""
    out = []
    for etype, n in named:
        for lang in ("zh", "en"):
            attr = rng.choice(W.attrs_of(etype))
            k = rng.choice(q_indices)
            out.append((W.SCHEMA[etype][attr]["q_" + lang][k].format(n=n[lang]), lang))
    return out


def _tasks(lang, evaluated):
    """Trained: the trained fillers of the trained templates. Evaluated: the other fillers of those, and every
    filler of the templates never trained."""
    trained_templates = _split(TASKS[lang])[0]
    rows = []
    for template, fillers in TASKS[lang]:
        trained_fillers, new_fillers = _split(fillers)
        if (template, fillers) in trained_templates:
            rows += [template.format(x=x) for x in (new_fillers if evaluated else trained_fillers)]
        elif evaluated:
            rows += [template.format(x=x) for x in fillers]
    return rows


def abstain_rows(world, seed, evaluated):
    """Out-of-world prompts with their reply: (prompt, reply, lang, kind). Trained rows use the first question
    wordings, the trained facts and tasks and the training names; evaluated rows use only what training never saw:
    the last question wording, new names, the evaluated facts, and tasks whose template or filler is new."""
    rng = random.Random(f"minimind-demo-abstain-{seed}-{evaluated}")
    names = unknown_names(world, seed)[evaluated]
    rows = [(q, ABSTAIN[lang], lang, "unknown_name") for q, lang in _name_questions(rng, names, [2] if evaluated else [0, 1])]
    for lang in ("zh", "en"):
        rows += [(q, ABSTAIN[lang], lang, "unknown_fact") for q in _split(UNKNOWN_FACTS[lang])[evaluated]]
        rows += [(q, CANNOT[lang], lang, "task") for q in _tasks(lang, evaluated)]
    rng.shuffle(rows)
    return rows


def abstains(output, lang):
    """Whether the first answer says, in the question's language, that the model does not know or cannot do it."""
    from .measure import first_answer
    answer = first_answer(output).lower()
    return any(m in answer for m in ABSTAIN_MARKERS[lang])


def open_prompts(world, rng, n=60):
    """Open requests about held-out entities plus small talk, for the loop rate."""
    held = [e for t in W.TYPES for e in world["entities"][t] if e["split"] == "heldout"]
    out = []
    for _ in range(n - len(SMALL_TALK)):
        e = rng.choice(held)
        lang = rng.choice(W.languages(e))
        out.append({"prompt": rng.choice(OPEN_PROMPTS[lang]).format(n=e[lang]), "lang": lang})
    return out + [{"prompt": p, "lang": "en" if p.isascii() else "zh"} for p in SMALL_TALK]
