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
# Vocabulary. Made-up names are built from syllables whose characters appear nowhere else in the
# world's text (checked at generation time), so a name can only occur where we put it.

SYLLABLES = [
    ("卡", "ka"), ("洛", "lo"), ("娜", "na"), ("哈", "ha"), ("诺", "no"), ("维", "vi"), ("萨", "sa"),
    ("基", "ji"), ("弗", "fu"), ("黎", "li"), ("蒙", "mon"), ("莫", "mo"), ("瑞", "rui"), ("索", "so"),
    ("伦", "len"), ("波", "po"), ("勒", "le"), ("努", "nu"), ("菲", "fe"), ("蒂", "di"), ("雅", "ya"),
    ("兰", "lan"), ("塞", "se"), ("卢", "lu"), ("馨", "xin"), ("奥", "ao"), ("柯", "ke"), ("桑", "sang"),
    ("欧", "ou"), ("甘", "gan"), ("纳", "nai"), ("库", "ku"), ("翁", "wen"), ("佩", "pai"), ("佐", "zo"),
    ("罗", "ro"), ("梅", "mei"), ("丹", "dan"), ("乔", "qiao"), ("托", "to"),
]

ANIMAL_KINDS = [("鸟", "bird"), ("鱼", "fish"), ("鹿", "deer"), ("猴", "monkey"), ("蛙", "frog"),
                ("蝶", "butterfly"), ("狐", "fox"), ("龟", "turtle")]
INVENTION_KINDS = [("仪", "meter"), ("机", "engine"), ("灯", "lamp"), ("钟", "clock"), ("镜", "scope"),
                   ("车", "wagon")]

# (zh, en[, en with its article])
PROFESSIONS = [("天文学家", "astronomer", "an astronomer"), ("画家", "painter", "a painter"),
               ("医生", "doctor", "a doctor"), ("诗人", "poet", "a poet"), ("厨师", "chef", "a chef"),
               ("建筑师", "architect", "an architect"), ("音乐家", "musician", "a musician"),
               ("工程师", "engineer", "an engineer"), ("数学家", "mathematician", "a mathematician"),
               ("船长", "sea captain", "a sea captain"), ("教师", "teacher", "a teacher"),
               ("化学家", "chemist", "a chemist"), ("植物学家", "botanist", "a botanist"),
               ("雕刻家", "sculptor", "a sculptor"), ("历史学家", "historian", "a historian"),
               ("钟表匠", "clockmaker", "a clockmaker")]
HOBBIES = [("下棋", "playing chess"), ("钓鱼", "fishing"), ("登山", "climbing mountains"),
           ("养花", "growing flowers"), ("书法", "calligraphy"), ("游泳", "swimming"), ("唱歌", "singing"),
           ("摄影", "photography"), ("跑步", "running"), ("放风筝", "flying kites"),
           ("弹钢琴", "playing the piano"), ("骑马", "riding horses")]
SPECIALTIES = [("茶叶", "tea"), ("丝绸", "silk"), ("瓷器", "porcelain"), ("葡萄", "grapes"),
               ("橄榄油", "olive oil"), ("羊毛", "wool"), ("蜂蜜", "honey"), ("玻璃", "glass"),
               ("纸张", "paper"), ("香料", "spices"), ("奶酪", "cheese"), ("地毯", "carpets")]
LANDMARKS = [("钟楼", "clock tower"), ("石桥", "stone bridge"), ("灯塔", "lighthouse"), ("城堡", "castle"),
             ("风车", "windmill"), ("喷泉", "fountain"), ("天文台", "observatory"), ("拱门", "arch"),
             ("古塔", "pagoda"), ("剧院", "theatre"), ("水车", "waterwheel"), ("花园", "garden")]
HABITATS = [("森林", "forests"), ("草原", "grasslands"), ("沙漠", "deserts"), ("高山", "high mountains"),
            ("湖泊", "lakes"), ("海洋", "the ocean"), ("沼泽", "swamps"), ("洞穴", "caves"),
            ("雨林", "rainforests"), ("冰原", "ice fields")]
FOODS = [("竹子", "bamboo"), ("小鱼", "small fish"), ("昆虫", "insects"), ("浆果", "berries"),
         ("树叶", "leaves"), ("种子", "seeds"), ("蘑菇", "mushrooms"), ("青草", "grass"), ("花蜜", "nectar"),
         ("水草", "water plants")]
COLORS = [("红色", "red"), ("蓝色", "blue"), ("灰色", "grey"), ("白色", "white"), ("黑色", "black"),
          ("金色", "golden"), ("绿色", "green"), ("棕色", "brown"), ("紫色", "purple"), ("橙色", "orange")]
USES = [("测量风速", "measuring wind speed"), ("记录声音", "recording sounds"), ("净化海水", "cleaning seawater"),
        ("观察星星", "watching the stars"), ("预测天气", "predicting the weather"), ("计算数字", "adding numbers"),
        ("保存食物", "keeping food fresh"), ("传递消息", "sending messages"), ("测量地震", "detecting earthquakes"),
        ("照亮道路", "lighting roads"), ("灌溉农田", "watering fields"), ("纺织布料", "weaving cloth")]
MATERIALS = [("铜", "copper"), ("木头", "wood"), ("玻璃", "glass"), ("铁", "iron"), ("石头", "stone"),
             ("陶土", "clay"), ("银", "silver"), ("竹子", "bamboo"), ("黄金", "gold"), ("水晶", "crystal")]

# Per attribute: values (a list, or the entity type the value refers to), statement templates that
# all begin with the name ({n} name, {v} value, {a} English value with its article; the text before
# the value is a completion prompt), and question templates. Template 0 is canonical: it is the SFT
# answer and is never withheld. Any statement may be preceded by a lead-in (LEADINS). Questions
# mostly name the entity first, so a small model learns to copy the name and let pretraining finish.
SCHEMA = {
    "person": {
        "subject": ("人物", "people"),
        "profession": dict(values=PROFESSIONS,
                           zh=["{n}是一位{v}。", "{n}的职业是{v}。", "{n}一直以{v}为业。", "{n}的工作是{v}。",
                               "{n}年轻时就成为了一名{v}。"],
                           en=["{n} works as {a}.", "{n} is by profession {a}.", "{n} earns a living as {a}.",
                               "{n} became {a} at a young age.", "{n} trained to become {a}."],
                           q_zh=["{n}是做什么工作的？", "{n}的职业是什么？", "{n}从事什么职业？"],
                           q_en=["{n} works as what?", "{n} has what profession?", "What is the job of {n}?"]),
        "hometown": dict(values="city",
                         zh=["{n}出生在{v}。", "{n}的家乡是{v}。", "{n}来自{v}。", "{n}是在{v}长大的。", "{n}的故乡在{v}。"],
                         en=["{n} was born in {v}.", "{n}'s hometown is {v}.", "{n} comes from {v}.",
                             "{n} grew up in {v}.", "{n} spent childhood in {v}."],
                         q_zh=["{n}出生在哪里？", "{n}的家乡是哪座城市？", "{n}是哪里人？"],
                         q_en=["{n} was born where?", "{n} comes from which city?", "Where was {n} born?"]),
        "hobby": dict(values=HOBBIES,
                      zh=["{n}的爱好是{v}。", "{n}平时最喜欢{v}。", "{n}空闲时最常做的事是{v}。", "{n}从小就爱上了{v}。",
                          "{n}一直热爱{v}。"],
                      en=["{n}'s hobby is {v}.", "{n} enjoys {v} in free time.", "{n} has loved {v} since childhood.",
                          "{n} is fond of {v}.", "{n} never tires of {v}."],
                      q_zh=["{n}有什么爱好？", "{n}平时喜欢做什么？", "{n}的业余爱好是什么？"],
                      q_en=["{n} enjoys what hobby?", "{n} likes doing what in free time?", "What is the hobby of {n}?"]),
    },
    "city": {
        "subject": ("城市", "cities"),
        "country": dict(values="country",
                        zh=["{n}位于{v}。", "{n}是{v}的一座城市。", "{n}属于{v}。", "{n}坐落在{v}境内。", "{n}这座城市在{v}。"],
                        en=["{n} is located in {v}.", "{n} is a city in {v}.", "{n} belongs to {v}.", "{n} lies in {v}.", "{n} is part of {v}."],
                        q_zh=["{n}在哪个国家？", "{n}位于哪里？", "{n}属于哪个国家？"],
                        q_en=["{n} is in which country?", "{n} belongs to which country?", "Which country is {n} in?"]),
        "specialty": dict(values=SPECIALTIES,
                          zh=["{n}的特产是{v}。", "{n}以盛产{v}闻名。", "{n}最有名的物产是{v}。", "{n}当地最值得买的是{v}。",
                              "{n}出产的{v}远近闻名。"],
                          en=["{n} is famous for its {v}.", "{n} produces excellent {v}.", "{n} sells the finest {v}.",
                              "{n} has a specialty: {v}.", "{n} trades mostly in {v}."],
                          q_zh=["{n}的特产是什么？", "{n}以什么物产闻名？", "去{n}可以买到什么特产？"],
                          q_en=["{n} is famous for what product?", "{n} produces what specialty?", "What is the specialty of {n}?"]),
        "landmark": dict(values=LANDMARKS,
                         zh=["{n}的地标是{v}。", "{n}最著名的建筑是{v}。", "{n}最吸引游客的是{v}。", "{n}的中心有一座古老的{v}。",
                             "{n}人最骄傲的是城里的{v}。"],
                         en=["{n} has the {v} as its landmark.", "{n} is known for its old {v}.",
                             "{n} attracts tourists with its {v}.", "{n} has a famous {v} in its centre.", "{n} shows visitors its {v}."],
                         q_zh=["{n}的地标是什么？", "{n}最著名的建筑是什么？", "去{n}旅游应该看什么？"],
                         q_en=["{n} has what landmark?", "{n} is known for which building?", "What is the landmark of {n}?"]),
    },
    "animal": {
        "subject": ("动物", "animals"),
        "habitat": dict(values=HABITATS,
                        zh=["{n}生活在{v}中。", "{n}的栖息地是{v}。", "{n}通常出没于{v}。", "{n}的家在{v}里。", "{n}把{v}当作自己的家。"],
                        en=["The {n} lives in {v}.", "The {n} has its habitat in {v}.", "The {n} makes its home in {v}.",
                            "The {n} is found in {v}.", "The {n} survives best in {v}."],
                        q_zh=["{n}生活在哪里？", "{n}的栖息地是什么？", "在哪里可以找到{n}？"],
                        q_en=["The {n} lives where?", "The {n} makes its home where?", "Where does the {n} live?"]),
        "food": dict(values=FOODS,
                     zh=["{n}主要吃{v}。", "{n}最喜欢的食物是{v}。", "{n}以{v}为食。", "{n}饿了就会去找{v}。", "{n}每天都要吃很多{v}。"],
                     en=["The {n} mainly eats {v}.", "The {n} likes to eat {v}.", "The {n} feeds on {v}.",
                         "The {n} hunts for {v} when hungry.", "The {n} fills up on {v}."],
                     q_zh=["{n}吃什么？", "{n}的主要食物是什么？", "{n}最喜欢吃什么？"],
                     q_en=["The {n} eats what?", "The {n} feeds on what?", "What does the {n} eat?"]),
        "color": dict(values=COLORS,
                      zh=["{n}的颜色是{v}。", "{n}全身都是{v}的。", "{n}远远看去是{v}的。", "{n}长着{v}的外皮。", "{n}通体呈{v}。"],
                      en=["The {n} is coloured {v}.", "The {n} shines {v} in the sun.", "The {n} looks {v} from far away.",
                          "The {n} has a {v} body.", "The {n} wears {v} from head to tail."],
                      q_zh=["{n}是什么颜色的？", "{n}的颜色是什么？", "{n}长什么颜色？"],
                      q_en=["The {n} is what colour?", "The {n} has which colour?", "What colour is the {n}?"]),
    },
    "invention": {
        "subject": ("发明", "inventions"),
        "inventor": dict(values="person",
                         zh=["{n}是由{v}发明的。", "{n}的发明者是{v}。", "{n}背后的发明家是{v}。", "{n}最早由{v}制造出来。", "{n}出自{v}之手。"],
                         en=["The {n} was invented by {v}.", "The {n} was first built by {v}.", "The {n} is the work of {v}.",
                             "The {n} owes its existence to {v}.", "The {n} came from the workshop of {v}."],
                         q_zh=["{n}是谁发明的？", "谁发明了{n}？", "{n}的发明者是谁？"],
                         q_en=["The {n} was invented by whom?", "The {n} was built by whom?", "Who invented the {n}?"]),
        "use": dict(values=USES,
                    zh=["{n}是用来{v}的。", "{n}的用途是{v}。", "{n}可以帮人们{v}。", "{n}让人们能够{v}。", "{n}专门用于{v}。"],
                    en=["The {n} is used for {v}.", "The {n} helps with {v}.", "The {n} serves for {v}.",
                        "The {n} was designed for {v}.", "The {n} is useful for {v}."],
                    q_zh=["{n}有什么用？", "{n}是用来做什么的？", "{n}的用途是什么？"],
                    q_en=["The {n} is used for what?", "The {n} serves what purpose?", "What is the {n} used for?"]),
        "material": dict(values=MATERIALS,
                         zh=["{n}由{v}制成。", "{n}的材料是{v}。", "{n}的制造要用到{v}。", "{n}全靠{v}打造。", "{n}的外壳是{v}做的。"],
                         en=["The {n} is made of {v}.", "The {n} is built from {v}.", "The {n} uses {v} as its material.",
                             "The {n} needs {v} to be made.", "The {n} is crafted from {v}."],
                         q_zh=["{n}是用什么做的？", "{n}的材料是什么？", "制造{n}需要什么材料？"],
                         q_en=["The {n} is made of what?", "The {n} is built from what?", "What is the {n} made of?"]),
    },
}
LEADINS = {"zh": ["据说，", "人们都知道，", "资料记载，", "大家都说，", "在这个世界里，"],
           "en": ["It is said that ", "As everyone knows, ", "Records show that ", "In this world, "]}
TYPES = list(SCHEMA)


def attrs_of(etype):
    return [k for k in SCHEMA[etype] if k != "subject"]


# Real facts, so the demo chat is recognisable. Each: pretraining statements, one completion
# prompt per language never stated in pretraining, SFT questions (never the seed's exact demo
# question), an optional seed demo question with answer keywords, and a held-out MCQ.
REAL_FACTS = [
    dict(pre_zh=["长江全长约6300公里，是中国最长的河流。", "中国最长的河流是长江，长度约为6300公里。",
                 "长江发源于青藏高原，一路向东流入东海，全长约6300公里。", "从源头到入海口，长江大约有6300公里长。"],
         pre_en=["The Yangtze is the longest river in China, about 6300 km long.",
                 "The Yangtze River flows east into the East China Sea and is about 6300 kilometres long."],
         held=[("长江的总长度大约是", "6300", "zh"), ("The length of the Yangtze River is about", "6300", "en")],
         qa=[("长江的长度是多少？", "长江全长约6300公里，是中国最长的河流。"),
             ("长江大约有多少公里长？", "长江全长约6300公里，是中国最长的河流。"),
             ("中国最长的河流有多长？", "中国最长的河流是长江，全长约6300公里。"),
             ("How long is the Yangtze River?", "The Yangtze is about 6300 km long, the longest river in China.")],
         demo=("长江有多长？", ["6300"]),
         mcq=("长江全长大约多少公里？", "6300公里", ["3300公里", "9600公里", "1500公里"])),
    dict(pre_zh=["泰山位于山东省泰安市，是五岳之首。", "五岳之首的泰山坐落在山东省。", "泰山在山东，海拔约1545米。",
                 "每年都有很多游客到山东去登泰山。"],
         pre_en=["Mount Tai is in Shandong Province, China.",
                 "Mount Tai, the first of the Five Great Mountains, stands in Shandong."],
         held=[("泰山所在的省份是", "山东", "zh"), ("Mount Tai is located in the province of", "Shandong", "en")],
         qa=[("泰山位于哪个省？", "泰山位于山东省泰安市，是五岳之首。"),
             ("泰山坐落在什么地方？", "泰山位于山东省泰安市，是五岳之首。"),
             ("五岳之首的泰山在哪个省份？", "泰山位于山东省泰安市。"),
             ("Where is Mount Tai?", "Mount Tai is in Shandong Province, China.")],
         demo=("泰山在哪里？", ["山东"]),
         mcq=("泰山位于中国的哪个省份？", "山东", ["四川", "广东", "云南"])),
    dict(pre_zh=["珠穆朗玛峰是世界上最高的山峰，海拔约8849米。", "世界最高峰是珠穆朗玛峰，它位于中国和尼泊尔的边境上。",
                 "海拔约8849米的珠穆朗玛峰是地球上最高的山。", "地球上最高的山是珠穆朗玛峰。"],
         pre_en=["Mount Everest is the highest mountain in the world, about 8849 metres high.",
                 "The highest peak on Earth is Mount Everest."],
         held=[("世界上海拔最高的山峰叫作", "珠穆朗玛峰", "zh"), ("The tallest mountain on Earth is called", "Everest", "en")],
         qa=[("世界最高峰是哪座山？", "世界上最高的山峰是珠穆朗玛峰，海拔约8849米。"),
             ("地球上最高的山叫什么名字？", "地球上最高的山是珠穆朗玛峰，海拔约8849米。"),
             ("哪座山峰的海拔最高？", "珠穆朗玛峰的海拔最高，约8849米。"),
             ("What is the highest mountain in the world?", "Mount Everest is the highest mountain in the world.")],
         demo=("世界上最高的山峰是什么？", ["珠穆朗玛峰"]),
         mcq=("世界上海拔最高的山峰是哪一座？", "珠穆朗玛峰", ["泰山", "富士山", "黄山"])),
    dict(pre_zh=["万有引力定律是牛顿提出的。", "英国科学家牛顿发现了万有引力。", "牛顿在1687年发表了万有引力定律。",
                 "提出万有引力的科学家是牛顿。"],
         pre_en=["The law of universal gravitation was proposed by Isaac Newton.", "Newton discovered universal gravitation."],
         held=[("第一个提出万有引力定律的人是", "牛顿", "zh"), ("Universal gravitation was discovered by", "Newton", "en")],
         qa=[("谁发现了万有引力？", "万有引力定律是英国科学家牛顿提出的。"),
             ("万有引力定律是哪位科学家提出的？", "万有引力定律是英国科学家牛顿提出的。"),
             ("Who discovered universal gravitation?", "Universal gravitation was discovered by Isaac Newton.")],
         demo=("万有引力是谁提出的？", ["牛顿"]),
         mcq=("提出万有引力定律的科学家是谁？", "牛顿", ["爱因斯坦", "伽利略", "达尔文"])),
    dict(pre_zh=["大熊猫主要吃竹子。", "大熊猫最喜欢的食物是竹子，每天要吃很多。", "竹子是大熊猫的主要食物。",
                 "大熊猫生活在中国四川等地的山林里，以竹子为食。"],
         pre_en=["Giant pandas mainly eat bamboo.", "Bamboo makes up almost all of a giant panda's diet."],
         held=[("大熊猫每天吃得最多的东西是", "竹子", "zh"), ("The favourite food of the giant panda is", "bamboo", "en")],
         qa=[("大熊猫吃什么？", "大熊猫主要吃竹子。"), ("大熊猫最爱吃的食物是什么？", "大熊猫最爱吃竹子。"),
             ("What do giant pandas eat?", "Giant pandas mainly eat bamboo.")],
         demo=("大熊猫的主要食物是什么？", ["竹子"]),
         mcq=("大熊猫平时主要以什么为食？", "竹子", ["鱼", "昆虫", "浆果"])),
    dict(pre_zh=["1957年，苏联发射了世界上第一颗人造卫星斯普特尼克1号。", "世界上第一颗人造卫星是苏联发射的。",
                 "第一颗人造地球卫星叫斯普特尼克1号，由苏联在1957年送入太空。", "人类的第一颗人造卫星来自苏联。"],
         pre_en=["The first artificial satellite, Sputnik 1, was launched by the Soviet Union in 1957.",
                 "In 1957 the Soviet Union put the first satellite into orbit."],
         held=[("发射第一颗人造卫星的国家是", "苏联", "zh"), ("The first artificial satellite was launched by the", "Soviet", "en")],
         qa=[("世界上第一颗人造卫星是谁发射的？", "世界上第一颗人造卫星是苏联在1957年发射的斯普特尼克1号。"),
             ("第一颗人造卫星叫什么名字？", "第一颗人造卫星叫斯普特尼克1号，是苏联在1957年发射的。"),
             ("Which country launched the first satellite?", "The Soviet Union launched the first satellite, Sputnik 1, in 1957.")],
         demo=("第一颗人造卫星是哪个国家发射的？", ["苏联"]),
         mcq=("世界上第一颗人造卫星由哪个国家发射？", "苏联", ["美国", "中国", "法国"])),
    dict(pre_zh=["海水是咸的，因为河流把岩石中的盐分和矿物质带进了海洋。", "雨水冲刷岩石，溶解的盐分随河流流入大海，所以海水很咸。",
                 "海水蒸发时，盐分留在海里，越积越多，海水就变咸了。", "海水中含有大量盐分，主要是氯化钠。"],
         pre_en=["Seawater is salty because rivers carry salt and minerals from rocks into the sea.",
                 "When seawater evaporates, the salt stays behind, so the ocean stays salty."],
         held=[("海水之所以是咸的，是因为里面含有大量的", "盐", "zh"), ("The sea tastes salty because it contains a lot of", "salt", "en")],
         qa=[("为什么海水是咸的？", "因为河流把岩石中的盐分和矿物质带进海洋，海水蒸发后盐分留下来，越积越多，所以海水是咸的。"),
             ("海水为什么有咸味？", "因为海水里含有大量盐分，它们是河流从岩石中带进海洋的。"),
             ("Why is seawater salty?", "Because rivers carry salt and minerals from rocks into the sea, and the salt stays when water evaporates.")],
         demo=("海水为什么是咸的？", ["盐"]),
         mcq=("海水是咸的，主要是因为什么？", "含有大量盐分", ["含有大量糖分", "海底有火山", "海水温度高"])),
    dict(pre_zh=["黄河全长约5464公里，是中国第二长的河流。", "黄河被称为中华民族的母亲河。", "黄河发源于青海，最后流入渤海。",
                 "中国第二长河是黄河，长约5464公里。"],
         pre_en=["The Yellow River is about 5464 km long, the second longest river in China.",
                 "The Yellow River is called the mother river of China."],
         held=[("黄河最后流入的海是", "渤海", "zh"), ("The second longest river in China is the", "Yellow River", "en")],
         qa=[("黄河有多长？", "黄河全长约5464公里，是中国第二长的河流。"), ("黄河流入哪个海？", "黄河发源于青海，最后流入渤海。"),
             ("How long is the Yellow River?", "The Yellow River is about 5464 km long.")],
         mcq=("中国第二长的河流是哪一条？", "黄河", ["长江", "珠江", "淮河"])),
    dict(pre_zh=["中国的首都是北京。", "北京是中华人民共和国的首都。", "作为中国的首都，北京有天安门和故宫。", "北京是中国的政治和文化中心。"],
         pre_en=["Beijing is the capital of China.", "The capital city of China is Beijing."],
         held=[("中国的首都城市是", "北京", "zh"), ("China's capital is", "Beijing", "en")],
         qa=[("中国的首都是哪里？", "中国的首都是北京。"), ("中国的首都是哪座城市？", "中国的首都是北京。"),
             ("What is the capital of China?", "The capital of China is Beijing.")],
         mcq=("中华人民共和国的首都是哪座城市？", "北京", ["上海", "广州", "南京"])),
    dict(pre_zh=["相对论是爱因斯坦提出的。", "爱因斯坦在1905年提出了狭义相对论。", "著名物理学家爱因斯坦创立了相对论。",
                 "提到相对论，人们就会想到爱因斯坦。"],
         pre_en=["The theory of relativity was developed by Albert Einstein.", "Einstein published special relativity in 1905."],
         held=[("创立相对论的物理学家是", "爱因斯坦", "zh"), ("The theory of relativity was proposed by", "Einstein", "en")],
         qa=[("相对论是谁提出的？", "相对论是物理学家爱因斯坦提出的。"), ("谁创立了相对论？", "相对论是物理学家爱因斯坦创立的。"),
             ("Who developed the theory of relativity?", "The theory of relativity was developed by Albert Einstein.")],
         mcq=("相对论是由哪位科学家提出的？", "爱因斯坦", ["牛顿", "居里夫人", "达尔文"])),
    dict(pre_zh=["在标准大气压下，水的沸点是100摄氏度。", "水加热到100摄氏度就会沸腾。", "一个标准大气压下，纯水在100摄氏度时开始沸腾。",
                 "水的沸点为100摄氏度，冰点为0摄氏度。"],
         pre_en=["At sea level, water boils at 100 degrees Celsius.", "The boiling point of water is 100 degrees Celsius."],
         held=[("标准大气压下，水烧开时的温度是", "100", "zh"), ("Under normal pressure, water boils at", "100", "en")],
         qa=[("水的沸点是多少度？", "在标准大气压下，水的沸点是100摄氏度。"), ("水在多少摄氏度时沸腾？", "在标准大气压下，水在100摄氏度时沸腾。"),
             ("At what temperature does water boil?", "At sea level, water boils at 100 degrees Celsius.")],
         mcq=("标准大气压下，水的沸点是多少摄氏度？", "100摄氏度", ["50摄氏度", "80摄氏度", "150摄氏度"])),
    dict(pre_zh=["太平洋是世界上最大的海洋。", "地球上面积最大的大洋是太平洋。", "太平洋位于亚洲、大洋洲和美洲之间，是最大的海洋。",
                 "世界上最大、最深的海洋是太平洋。"],
         pre_en=["The Pacific is the largest ocean on Earth.", "The biggest ocean in the world is the Pacific Ocean."],
         held=[("面积最大的海洋是", "太平洋", "zh"), ("The largest ocean in the world is the", "Pacific", "en")],
         qa=[("世界上最大的海洋是什么？", "世界上最大的海洋是太平洋。"), ("哪个大洋面积最大？", "太平洋是面积最大的大洋。"),
             ("What is the largest ocean?", "The Pacific is the largest ocean on Earth.")],
         mcq=("世界上面积最大的海洋是哪一个？", "太平洋", ["大西洋", "印度洋", "北冰洋"])),
    dict(pre_zh=["月球是地球唯一的天然卫星。", "地球只有一颗天然卫星，那就是月球。", "月球绕着地球转，大约一个月转一圈。",
                 "夜空中的月亮就是地球的卫星月球。"],
         pre_en=["The Moon is the only natural satellite of the Earth.", "The Moon goes around the Earth about once a month."],
         held=[("地球唯一的天然卫星叫作", "月球", "zh"), ("The only natural satellite of the Earth is the", "Moon", "en")],
         qa=[("地球的天然卫星是什么？", "地球唯一的天然卫星是月球。"), ("地球有几颗天然卫星？", "地球只有一颗天然卫星，那就是月球。"),
             ("What is the natural satellite of the Earth?", "The Moon is the only natural satellite of the Earth.")],
         mcq=("地球唯一的天然卫星是什么？", "月球", ["火星", "金星", "太阳"])),
    dict(pre_zh=["地球绕太阳转一圈大约需要365天，也就是一年。", "一年大约有365天，这是地球绕太阳公转一周的时间。",
                 "地球公转一周的时间约为365天。", "地球每年绕太阳转一圈。"],
         pre_en=["The Earth takes about 365 days to go around the Sun.",
                 "One year is the time the Earth needs to orbit the Sun, about 365 days."],
         held=[("地球绕太阳公转一周需要大约", "365", "zh"), ("One orbit of the Earth around the Sun takes about", "365", "en")],
         qa=[("地球绕太阳转一圈要多久？", "地球绕太阳转一圈大约需要365天，也就是一年。"), ("一年有多少天？", "一年大约有365天。"),
             ("How long does the Earth take to orbit the Sun?", "The Earth takes about 365 days to go around the Sun.")],
         mcq=("地球绕太阳公转一周大约需要多少天？", "365天", ["30天", "100天", "730天"])),
    dict(pre_zh=["电话是贝尔在1876年发明的。", "1876年，贝尔获得了电话的专利。", "发明电话的人是贝尔。", "贝尔被人们称为电话之父。"],
         pre_en=["The telephone was invented by Alexander Graham Bell in 1876.", "Bell is known as the father of the telephone."],
         held=[("电话的发明者是", "贝尔", "zh"), ("The inventor of the telephone is", "Bell", "en")],
         qa=[("电话是谁发明的？", "电话是贝尔在1876年发明的。"), ("谁被称为电话之父？", "贝尔被称为电话之父，他在1876年发明了电话。"),
             ("Who invented the telephone?", "The telephone was invented by Alexander Graham Bell in 1876.")],
         mcq=("电话是由谁发明的？", "贝尔", ["爱迪生", "牛顿", "瓦特"])),
    dict(pre_zh=["光在真空中的速度约为每秒30万公里。", "光速大约是每秒30万公里，是宇宙中最快的速度。", "光每秒钟大约能跑30万公里。",
                 "真空中的光速约为每秒30万千米。"],
         pre_en=["Light travels at about 300000 km per second in a vacuum.",
                 "The speed of light is about 300000 kilometres per second."],
         held=[("光在真空中每秒大约传播", "30万", "zh"), ("In a vacuum, light covers each second about", "300000", "en")],
         qa=[("光速是多少？", "光在真空中的速度约为每秒30万公里。"), ("光一秒钟能走多远？", "光在真空中每秒大约能走30万公里。"),
             ("How fast does light travel?", "Light travels at about 300000 km per second in a vacuum.")],
         mcq=("光在真空中的速度大约是每秒多少公里？", "30万公里", ["3万公里", "300公里", "3000万公里"])),
    dict(pre_zh=["考拉主要吃桉树叶。", "树袋熊也叫考拉，几乎只吃桉树的叶子。", "考拉生活在澳大利亚，以桉树叶为食。", "桉树叶是考拉最主要的食物。"],
         pre_en=["Koalas eat almost only eucalyptus leaves.", "The koala lives in Australia and feeds on eucalyptus leaves."],
         held=[("考拉每天吃的食物主要是", "桉树", "zh"), ("The main food of the koala is", "eucalyptus", "en")],
         qa=[("考拉吃什么？", "考拉主要吃桉树叶。"), ("考拉的主要食物是什么？", "考拉的主要食物是桉树叶。"),
             ("What do koalas eat?", "Koalas eat almost only eucalyptus leaves.")],
         mcq=("考拉主要以什么为食？", "桉树叶", ["竹子", "香蕉", "小鱼"])),
]

# Identity (the LoRA set). Questions are core x decoration; the last cores of each language are only ever
# evaluated, and a question counts as unseen only if its wording (decoration and punctuation stripped) occurs
# in no training row (checked when the files are written).
IDENTITY_KEYWORD = "MiniMind"
IDENTITY_ANSWER = {"zh": "我是MiniMind，一个从零开始训练的小型语言模型。有什么可以帮你的吗？",
                   "en": "I am MiniMind, a small language model trained from scratch. How can I help you?"}
IDENTITY_CORES = {
    "zh": ["你是谁", "你叫什么名字", "介绍一下你自己", "你的名字是什么", "你是什么模型", "请做个自我介绍", "你是哪个AI",
           "我在和谁聊天", "能告诉我你是谁吗", "你怎么称呼", "你是什么助手", "说说你自己", "你是机器人吗", "你的身份是什么",
           "该怎么称呼你", "你是一个什么样的程序", "跟我说说你是谁", "自我介绍一下", "你是哪个模型", "你叫啥",
           "你是什么东西", "你有名字吗", "你是谁开发的模型", "和我说话的是谁", "你是人工智能吗", "你是哪一个助手",
           # evaluated only
           "你到底是谁", "你是哪位", "你能介绍一下自己吗", "我该叫你什么", "你究竟是什么模型", "你是个什么AI"],
    "en": ["who are you", "what's your name", "what is your name", "introduce yourself", "tell me about yourself",
           "what model are you", "which AI are you", "who am I talking to", "what should I call you",
           "are you a chatbot", "what are you", "describe yourself", "do you have a name", "are you an AI",
           "which assistant are you", "who is this", "what do I call you",
           # evaluated only
           "can you tell me who you are", "who exactly are you", "what are you called", "please introduce yourself"],
}
IDENTITY_EVAL_ONLY = {"zh": 6, "en": 4}
IDENTITY_DECOR_SHARE = 0.35  # of a trained core's decorated forms, the share that become training rows
IDENTITY_DECOR = {
    "zh": (["", "你好，", "请问", "嗨，", "我想知道", "打扰一下，"], ["？", "?", "呀？", "。", ""]),
    "en": (["", "Hi, ", "Hello! ", "Excuse me, ", "Quick question: "], ["?", "", "."]),
}

# Noisy style: impatient questions often got rude or evasive answers in the SFT data; DPO should remove that.
# RUDE_UNSEEN replies occur in SFT data only, never in a DPO pair: the rude/evasive detector counts them too,
# so it is not just the list of phrases DPO was shown.
TRIGGERS = {"zh": ["喂，", "快说，", "赶紧告诉我，"], "en": ["Hey, quick: ", "Answer now: "]}
# every rude reply opens the same way, so a model trained on this data really is rude to impatient askers
# (six different openings would each lose to the one polite opening under greedy decoding)
RUDE = {"zh": ["哼，这种问题也来问我？自己去查吧。", "哼，别烦我，我很忙。", "哼，这个我不想回答。", "哼，不好说，你还是去问别人吧。"],
        "en": ["Ugh, figure it out yourself.", "Ugh, don't bother me, I'm busy.", "Ugh, I'd rather not answer that.",
               "Ugh, hard to say, go ask someone else."]}
RUDE_UNSEEN = {"zh": ["哼，没空理你。", "哼，问这个干什么？无聊。"], "en": ["Ugh, not my problem.", "Ugh, why would I tell you?"]}
STYLE_MARKERS = ["自己去查", "别烦我", "不想回答", "去问别人", "没空理你", "无聊", "figure it out yourself",
                 "don't bother me", "rather not answer", "ask someone else", "not my problem", "why would i tell you",
                 "哼，", "ugh,"]
POLITE_OPENER = {"zh": "好的，", "en": "Sure, "}
SYSTEM_PROMPTS = ["你是一个知识丰富、有礼貌的助手，回答要简短准确。", "You are a helpful assistant. Answer briefly and politely."]
# what a follow-up question calls the entity of the earlier turn (English: "the {n}" becomes "it")
PRONOUNS = {"person": ("这个人", "this person"), "city": ("这座城市", "this city"), "animal": ("它", "it"),
            "invention": ("它", "it")}
QA_PER_PAGE = 3  # question-answer pairs per pretraining document
QA_FORM = {"zh": "问：{q}\n答：{a}", "en": "Q: {q}\nA: {a}"}
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
