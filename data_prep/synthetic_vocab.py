"""Word pools and sentence templates for the synthetic LongLaMP data (see data_prep.synthetic).

Topic words (products, research fields, reddit themes) carry the query; style words (favourite
adjectives, intensifiers, openers, closers, signature phrases) carry the user. Signature words are
used nowhere else, so finding one in a text means the user's style put it there.
"""

from __future__ import annotations

# Two-word signature phrases are drawn as unique (adjective, noun) pairs: 40 x 40 = 1600 users.
SIGNATURE_ADJECTIVES = (
    "velvet", "copper", "amber", "cobalt", "saffron", "granite", "juniper", "marble", "hazel",
    "indigo", "opal", "crimson", "silver", "ivory", "cedar", "maple", "lunar", "coral", "ember",
    "frosty", "golden", "misty", "rustic", "sable", "teal", "umber", "willow", "zesty", "breezy",
    "crisp", "dapper", "fuzzy", "jolly", "mellow", "nimble", "plucky", "quirky", "snug", "tidy", "witty",
)
SIGNATURE_NOUNS = (
    "thunder", "lantern", "orchard", "compass", "harbor", "meadow", "pebble", "quill", "lagoon",
    "beacon", "canyon", "falcon", "glacier", "hammock", "kettledrum", "lighthouse", "marmalade",
    "nebula", "otter", "pinecone", "quasar", "riverbend", "saddle", "tundra", "walrus", "yarrow",
    "zephyr", "bramble", "cricket", "dumpling", "fiddle", "gazebo", "hedgehog", "igloo", "jackal",
    "kayak", "lagoonfish", "mosaic", "nutmeg", "porcupine",
)
INTENSIFIERS = ("really", "super", "remarkably", "quite", "insanely", "genuinely", "seriously",
                "properly", "wildly", "truly")
FIRST_NAMES = ("Mara", "Tobias", "Ines", "Kenji", "Amara", "Lukas", "Priya", "Oskar", "Sofia",
               "Mateo", "Hana", "Elias", "Nadia", "Rafael", "Yara", "Jonas", "Leila", "Victor",
               "Aiko", "Bruno", "Chiara", "Dmitri", "Esme", "Farid")
LAST_NAMES = ("Lindqvist", "Okafor", "Moreau", "Tanaka", "Castillo", "Novak", "Hansen", "Iyer",
              "Keller", "Duarte", "Sato", "Brennan", "Volkov", "Adeyemi", "Ferreira", "Nakamura",
              "Schmidt", "Rossi", "Kowalski", "Haddad", "Larsen", "Mendes", "Quinn", "Weber")
HANDLE_WORDS = ("quiet", "rapid", "sleepy", "brave", "lucky", "grumpy", "curious", "sunny",
                "cosmic", "humble")
HANDLE_ANIMALS = ("otter", "badger", "heron", "lynx", "moth", "panda", "raven", "gecko", "koala",
                  "bison")

# --- product reviews -------------------------------------------------------------------------
PRODUCT_CATEGORIES = {
    "kitchen": dict(products=("kettle", "blender", "skillet", "coffee grinder", "toaster"),
                    features=("handle", "lid", "heating element", "power cord", "blade"),
                    materials=("stainless steel", "cast iron", "ceramic", "borosilicate glass")),
    "audio": dict(products=("headphones", "soundbar", "earbuds", "turntable", "speaker"),
                  features=("bass", "battery", "ear cushion", "bluetooth pairing", "volume knob"),
                  materials=("aluminium", "memory foam", "walnut veneer", "matte plastic")),
    "outdoor": dict(products=("tent", "sleeping bag", "headlamp", "trekking pole", "backpack"),
                    features=("zipper", "rain fly", "hip belt", "strap", "stake loop"),
                    materials=("ripstop nylon", "down fill", "carbon fiber", "polyester")),
    "tools": dict(products=("drill", "socket set", "workbench", "tape measure", "soldering iron"),
                  features=("chuck", "trigger", "battery pack", "grip", "tip"),
                  materials=("hardened steel", "rubberized grip", "birch plywood", "chrome vanadium")),
    "toys": dict(products=("xylophone", "puzzle", "building set", "plush bear", "kite"),
                 features=("paint", "box lid", "stitching", "instruction booklet", "string"),
                 materials=("beech wood", "cardboard", "soft fleece", "ABS plastic")),
    "beauty": dict(products=("hair dryer", "face serum", "electric razor", "moisturizer", "brush set"),
                   features=("nozzle", "scent", "foil", "texture", "bristle density"),
                   materials=("argan oil", "ceramic coating", "vegan bristles", "shea butter")),
}
BRANDS = ("Norvik", "Aldenmoor", "Kestrel", "Brightwell", "Tamsin", "Orrin", "Velden", "Caspar")
REVIEW_FAVORITE_ADJECTIVES = ("sturdy", "delightful", "handy", "slick", "cozy", "reliable",
                              "elegant", "snappy", "solid", "charming", "clever", "gorgeous")
REVIEW_NEGATIVE_ADJECTIVES = ("flimsy", "clunky", "noisy", "cheap", "awkward", "wobbly")
DURATIONS = ("two weeks", "a month", "three months", "half a year", "a year", "ten days")
REVIEW_POSITIVE = (
    "The {feature} is {intens} {adj}.",
    "I have used this {product} for {duration} and it still feels {adj}.",
    "Compared to my old {product}, the {feature} is {intens} better.",
    "Setup took about {small} minutes, e.g. unboxing and a quick test.",
    "It arrived in {small} days and the {feature} was {adj} out of the box.",
    "For the price, the {material} build is {intens} {adj}.",
    "I would rate the {feature} a {score} out of 5.0 without hesitation.",
)
REVIEW_NEUTRAL = (
    "The {feature} is fine but not exactly {adj}.",
    "It does the job, although the {feature} could be better.",
    "After {duration} the {feature} started to feel a bit {neg}.",
    "The {material} looks nice, yet the {feature} is only average.",
)
REVIEW_NEGATIVE = (
    "The {feature} felt {neg} from day one.",
    "After {duration} the {feature} simply stopped working.",
    "I expected a {adj} {product}, but this one is {intens} {neg}.",
    "Support in the U.S. took {small} days to answer about the {feature}.",
    "The {material} scratched within {duration}, which is {intens} disappointing.",
)
REVIEW_OPENERS = ("", "Okay, so here is my take.", "Long story short, I have opinions.",
                  "Let me keep this brief.", "Quick review from a busy parent.",
                  "Bought this on a whim last season.")
REVIEW_CLOSERS = ("Verdict: {sig}.", "As I always say, {sig}!", "{Sig} in my book.",
                  "Final word: {sig}.", "That is what I call {sig}.")

# --- abstract generation ---------------------------------------------------------------------
RESEARCH_FIELDS = {
    "signal processing": dict(
        methods=("sparse Bayesian learning", "Kalman filtering", "compressive sensing", "adaptive beamforming"),
        problems=("direction-of-arrival tracking", "channel estimation", "source localization"),
        concepts=("sparsity", "spatial smoothing", "off-grid errors"),
        datasets=("simulated array data", "a measured microphone array corpus"),
        metrics=("root mean square error", "tracking accuracy")),
    "language processing": dict(
        methods=("retrieval-augmented generation", "contrastive pretraining", "prompt tuning", "sequence labeling"),
        problems=("personalized text generation", "keyphrase extraction", "question answering"),
        concepts=("user history", "token budgets", "lexical overlap"),
        datasets=("the LongLaMP benchmark", "a multilingual news corpus"),
        metrics=("ROUGE-L", "METEOR")),
    "computer vision": dict(
        methods=("vision transformers", "diffusion models", "optical flow estimation", "self-supervised learning"),
        problems=("semantic segmentation", "pose estimation", "image restoration"),
        concepts=("multi-scale features", "occlusion reasoning", "data augmentation"),
        datasets=("COCO", "a synthetic driving dataset"),
        metrics=("mean intersection over union", "PSNR")),
    "databases": dict(
        methods=("integrity constraint simplification", "query rewriting", "learned indexes", "incremental view maintenance"),
        problems=("data integration", "consistency checking", "query optimization"),
        concepts=("local consistency", "update patterns", "cardinality estimates"),
        datasets=("TPC-H", "a federated hospital database"),
        metrics=("query latency", "throughput")),
    "networking": dict(
        methods=("software-defined networking", "congestion control", "network coding", "edge caching"),
        problems=("latency reduction", "traffic engineering", "packet scheduling"),
        concepts=("flow fairness", "buffer occupancy", "link utilization"),
        datasets=("a campus network trace", "an emulated 5G testbed"),
        metrics=("tail latency", "goodput")),
    "human-computer interaction": dict(
        methods=("research through design", "participatory design", "eye tracking", "diary studies"),
        problems=("distributed board game play", "accessible interfaces", "remote collaboration"),
        concepts=("social presence", "tangibility", "cognitive load"),
        datasets=("a twelve-week field deployment", "semi-structured interviews"),
        metrics=("task completion time", "perceived usability")),
}
ABSTRACT_FAVORITE_ADJECTIVES = ("novel", "principled", "lightweight", "scalable", "robust",
                                "efficient", "unified", "interpretable", "modular", "rigorous")
ABSTRACT_VERBS = (("propose", "proposes"), ("introduce", "introduces"), ("present", "presents"),
                  ("develop", "develops"), ("design", "designs"))
ABSTRACT_OPENERS = ("In this paper, we {verb} a {adj} approach to {problem} based on {method}.",
                    "We {verb} a {adj} {method} framework for {problem}.",
                    "This work {verbs} a {adj} way to address {problem} with {method}.",
                    "{Problem} remains difficult, and we {verb} a {adj} remedy built on {method}.")
ABSTRACT_BODY = (
    "{Problem} is a central challenge in {field}, e.g. in large deployments.",
    "Existing approaches based on {method2} suffer from poor handling of {concept}.",
    "Our method exploits {concept} to make {problem} {intens} {adj}.",
    "Unlike prior work by Smith et al., we do not assume perfect knowledge of {concept}.",
    "Experiments on {dataset} show that the proposed approach improves {metric} by {small}.{digit}%.",
    "We further analyse the {adj} behaviour of {concept} under realistic conditions.",
    "The results confirm that {concept} is {intens} important for {problem}.",
    "A careful ablation isolates the role of {concept} and {concept2}.",
)
ABSTRACT_CLOSERS = ("Overall, {sig} emerges as a practical recipe for {problem}.",
                    "We call this guiding principle {sig}.",
                    "The resulting toolkit, {Sig}, is released to the community.",
                    "In short, {sig} makes {problem} tractable.")

# --- topic writing (reddit) ------------------------------------------------------------------
REDDIT_TOPICS = {
    "running": dict(titles=("Finally finished my first half marathon", "Shin splints after {n} weeks of running",
                            "Need advice on running in cold weather"),
                    things=("interval training", "my running shoes", "the long Sunday run", "a foam roller"),
                    struggles=("keeping a steady pace", "waking up at 6 am", "sore calves")),
    "sourdough": dict(titles=("My sourdough starter is finally alive", "Why is my sourdough so dense?",
                              "{n} loaves later, here is what I learned about sourdough"),
                      things=("the starter", "a dutch oven", "rye flour", "the autolyse step"),
                      struggles=("getting an open crumb", "shaping wet dough", "timing the bulk rise")),
    "houseplants": dict(titles=("My monstera just grew a new leaf", "Help, my fiddle leaf fig is dropping leaves",
                                "Turned my balcony into a jungle in {n} months"),
                        things=("a grow light", "the watering schedule", "chunky soil mix", "my pothos"),
                        struggles=("fungus gnats", "overwatering", "low winter light")),
    "budgeting": dict(titles=("Paid off my credit card after {n} months", "How do you budget on an irregular income?",
                              "Tracked every expense for a year"),
                      things=("a spreadsheet", "the envelope method", "an emergency fund", "meal prepping"),
                      struggles=("impulse buys", "saving for rent", "eating out too much")),
    "guitar": dict(titles=("Learned my first barre chord", "Practicing guitar for {n} days straight",
                           "Acoustic or electric for a total beginner?"),
                   things=("a metronome", "fingerstyle patterns", "the capo", "new strings"),
                   struggles=("sore fingertips", "chord transitions", "staying in rhythm")),
    "moving": dict(titles=("Moved to a new city alone", "Tips for making friends after moving?",
                           "{n} months after moving abroad"),
                   things=("the local library", "a pottery class", "the new apartment", "a bike map"),
                   struggles=("loneliness", "finding a doctor", "learning the bus routes")),
}
REDDIT_BODY = (
    "So I started with {thing} about {small} months ago and it changed my routine.",
    "The hardest part was {struggle}, {slang}.",
    "My roommate thinks I am {intens} obsessed with {thing}.",
    "Does anyone have tips for {struggle}?",
    "I tried {thing} last week and it went {intens} well.",
    "Honestly {struggle} still gets me some days.",
    "Spent about {small}.{digit} hours on {thing} yesterday, e.g. reading old threads.",
    "Anyway, {thing} is {intens} worth it if you ask me.",
)
REDDIT_SLANG = ("tbh", "imo", "lol", "ngl", "fwiw", "idk")
REDDIT_EMOTICONS = ("", ":)", ":D", "^^", ";)")
REDDIT_CLOSERS = ("{Sig} out.", "Stay {sig}, everyone.", "Anyway, {sig} forever.",
                  "Thanks for reading, {sig} vibes only.")
