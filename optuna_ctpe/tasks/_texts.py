"""The text set of the MiniLM task: 96 pairs of paraphrases in 12 topics, written for this package.

Each pair says one thing twice in different words; the 8 pairs of a topic share its vocabulary
but not their meaning, so every sentence has hard negatives (same topic, another fact) besides
its paraphrase. The sentences were written by hand for optuna-ctpe, not taken from a benchmark
or a corpus, so they carry no licence but the package's own. No sentence occurs twice.
"""

from __future__ import annotations


__all__ = ["PARAPHRASE_PAIRS", "TOPICS"]

# One block per topic: pairs separated by a blank line, the two sentences of a pair on two lines.
_BLOCKS = {
    "cooking": """
Preheat the oven before you put the bread in.
Let the oven get hot first, then bake the loaf.

Add a pinch of salt to the pasta water.
The water for the noodles should be lightly salted.

Onions taste sweeter when they are cooked slowly.
Caramelising onions over low heat brings out their sugar.

Rest the steak for five minutes after grilling it.
Let grilled meat sit briefly before you cut it.

Whisk the eggs until they are light and foamy.
Beat the eggs until they turn pale and airy.

This soup freezes well for up to three months.
You can keep the soup in the freezer for a whole season.

Rice burns easily if the pan runs dry.
Without enough water the rice sticks and scorches.

A sharp knife is safer than a dull one.
Blunt blades cause more kitchen injuries than keen ones.
""",
    "weather": """
Heavy rain is expected in the north tomorrow.
Forecasters predict a downpour in northern areas tomorrow.

The temperature dropped below freezing last night.
It got colder than zero degrees overnight.

Strong winds knocked down several trees in the park.
A gale toppled a number of trees in the park.

The summer has been unusually dry this year.
There has been very little rain this summer.

Fog delayed flights at the airport this morning.
Planes could not take off on time because of the mist.

A heat wave will last until the end of the week.
The hot spell continues through to the weekend.

Snow closed the mountain pass for two days.
The road over the mountains was shut by snowfall for 48 hours.

The storm lost strength after it reached the coast.
Once it made landfall, the hurricane weakened.
""",
    "computers": """
Restart the computer to finish installing the update.
The update completes only after a reboot.

My laptop battery drains in under two hours.
The notebook runs out of charge very quickly.

Back up your files before you upgrade the system.
Save a copy of your data prior to the upgrade.

The program crashes whenever I open a large file.
Opening big files makes the application quit.

This password is too short to be secure.
A longer password would be much harder to guess.

The printer is not connected to the network.
The printer cannot be reached over the network.

Clearing the cache made the browser faster.
The web browser sped up once its stored data was deleted.

The server stores a copy of every upload.
Each uploaded file is kept on the server as well.
""",
    "health": """
Drinking enough water helps prevent headaches.
Staying hydrated can keep headaches away.

Regular exercise lowers blood pressure.
Working out often reduces hypertension.

Children need more sleep than adults do.
Kids require longer nights of rest than grown-ups.

Wash your hands before every meal.
Clean your hands each time before you eat.

The doctor prescribed antibiotics for the infection.
The physician gave me medicine to fight the bacteria.

Too much sugar is bad for your teeth.
Eating lots of sweets causes tooth decay.

She sprained her ankle while running.
Her ankle got twisted during a jog.

A flu vaccine is recommended every autumn.
Health services advise a yearly influenza shot in the fall.
""",
    "travel": """
The train to Paris leaves at nine in the morning.
The Paris train departs at 9 a.m.

Our flight was cancelled because of a strike.
The airline called off our flight due to industrial action.

You need a visa to enter the country.
Entry requires a visa.

The hotel room had a view of the sea.
From our room we could see the ocean.

We rented a car to explore the island.
To get around the island we hired a car.

Pack light if you are only staying a weekend.
For a two-night trip, bring a small bag.

The museum is closed on Mondays.
On Mondays the museum does not open.

The bus station is a short walk from the harbour.
You can reach the bus terminal on foot from the port in a few minutes.
""",
    "finance": """
Interest rates rose for the third time this year.
The central bank increased borrowing costs again, the third hike this year.

She pays off her credit card in full each month.
Every month she clears her entire card balance.

The company reported a loss for the quarter.
The firm lost money over the last three months.

Inflation makes savings worth less over time.
Rising prices erode the value of money in the bank.

He opened a savings account for his daughter.
He set up a deposit account in his child's name.

The shares fell sharply after the announcement.
The stock price plunged once the news came out.

Taxes are due by the end of April.
You must file your tax return before April is over.

The loan must be repaid within five years.
You have five years to pay back the money you borrowed.
""",
    "sports": """
The home team won the match in extra time.
The hosts secured victory after the game went to overtime.

She broke the national record in the 100 metres.
Her sprint set a new best for the country over 100 m.

The striker was sent off for a second yellow card.
A second booking got the forward ejected from the game.

The marathon starts at dawn to avoid the heat.
Runners begin the race at sunrise so it is cooler.

He has trained for the tournament all year.
His preparation for the championship took twelve months.

The referee's decision was disputed by both coaches.
Neither manager agreed with the official's call.

The stadium holds sixty thousand spectators.
Up to 60,000 fans fit in the arena.

The cyclist crashed on the final descent.
On the last downhill stretch the rider fell off his bike.
""",
    "animals": """
Cats sleep for most of the day.
A cat spends the majority of its day asleep.

The dog barks at every stranger.
Any unfamiliar person makes the dog bark.

Bees are essential for pollinating crops.
Many crops depend on bees to carry pollen.

Whales communicate with long, low songs.
Whales call to one another with deep, drawn-out sounds.

The owl hunts mice at night.
After dark, the owl preys on small rodents.

Horses can sleep standing up.
A horse is able to doze while on its feet.

The parrot learned to repeat our names.
Our parrot now says each of our names.

Penguins cannot fly but swim very well.
Though flightless, penguins are excellent swimmers.
""",
    "science": """
Water boils at a lower temperature at high altitude.
On a mountain, water starts boiling before it reaches 100 degrees.

The Earth orbits the Sun once a year.
Our planet takes one year to go around the Sun.

Light travels faster than sound.
Sound is slower than light.

Plants turn sunlight into chemical energy.
Through photosynthesis, plants store energy from the sun.

The experiment was repeated to confirm the result.
They ran the test again to verify the finding.

Metals expand when they are heated.
Heat makes metal grow slightly larger.

The Moon causes the tides in the ocean.
Ocean tides are driven by the pull of the Moon.

DNA carries the genetic instructions of a cell.
A cell's hereditary information is stored in its DNA.
""",
    "work": """
The meeting has been moved to Thursday afternoon.
We rescheduled the meeting for Thursday after lunch.

She was promoted to team leader last month.
Last month she became the head of her team.

Please send me the report by Friday.
I need the report from you before the weekend.

The office will be closed during the holidays.
Nobody will be working at the office over the holiday period.

He works from home two days a week.
Twice a week he does his job remotely.

The project is behind schedule and over budget.
The project is late and has cost more than planned.

New employees get two weeks of training.
Staff who just joined receive a fortnight of instruction.

The manager approved my request for leave.
My boss said yes to my time off.
""",
    "home": """
The kitchen tap has been dripping all week.
Water keeps leaking from the kitchen faucet for days now.

We painted the living room a pale blue.
The lounge now has light blue walls.

The heating does not work in the bedroom.
The bedroom radiator stays cold.

Take the rubbish out before the collection on Tuesday.
Put the bins out ahead of Tuesday's pickup.

The neighbours are building an extension.
The people next door are adding a room to their house.

The garden needs watering every evening in summer.
In hot months the plants outside must be watered each night.

We lost the key to the back door.
The back door key has gone missing.

The rent goes up in January.
Our landlord is raising the rent at the start of the year.
""",
    "history": """
The castle was built in the twelfth century.
The fortress dates from the 1100s.

The city was almost destroyed by a great fire.
A huge blaze nearly burned the whole town down.

The printing press spread books across Europe.
Thanks to printing, books became common throughout Europe.

The treaty ended a war that had lasted thirty years.
The agreement brought three decades of fighting to a close.

Ancient Egyptians built pyramids as tombs for their kings.
The pharaohs were buried in pyramids.

The empire collapsed after years of civil war.
Internal conflict eventually brought the empire down.

The old bridge was replaced by a modern one in 1960.
A new bridge took the place of the old crossing in 1960.

Explorers reached the South Pole in 1911.
The first expedition arrived at the South Pole in 1911.
""",
}


def _pairs(block: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for chunk in block.strip().split("\n\n"):
        first, second = chunk.strip().split("\n")
        pairs.append((first, second))
    return tuple(pairs)


#: Topic name -> its 8 (sentence, paraphrase) pairs.
TOPICS: dict[str, tuple[tuple[str, str], ...]] = {
    topic: _pairs(block) for topic, block in _BLOCKS.items()
}

#: Every pair of every topic, topic by topic, in the order of :data:`TOPICS`.
PARAPHRASE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    pair for pairs in TOPICS.values() for pair in pairs
)
