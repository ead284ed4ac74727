"""A long memory for the whole-text embedding tests: six paragraphs of a person's notes on
different topics (2,892 characters, about 600 tokens: more than twice what all-MiniLM-L6-v2
reads), whose last paragraph holds the fact a query asks about, and short unrelated memories.

Measured before whole-text embedding (only the first 256 tokens embedded): ``LATE_QUERY`` ranked
the long memory second, below "Is vegetarian but eats fish occasionally"; after, first.
"""

from __future__ import annotations

PARAGRAPHS = [
    "We spent most of the Monday planning meeting on the migration of the billing service. The "
    "team agreed to move the invoice generator first, because it has the fewest dependencies, and "
    "to keep the old cron jobs running in parallel for two weeks. Priya will own the rollback plan "
    "and Marcus will write the load tests. The deadline is the end of the quarter, though "
    "everybody admitted that the reporting module could slip if the vendor does not deliver the "
    "new API keys on time.",
    "The weekend trip to the coast went well overall. We left early on Saturday to avoid traffic, "
    "stopped at the bakery in the little harbour town for croissants, and walked along the cliffs "
    "for about three hours. The weather turned in the afternoon, so we spent the evening in the "
    "guesthouse playing cards. On Sunday the ferry was cancelled because of the wind, and we drove "
    "back the long way through the hills, which added almost two hours to the journey home.",
    "For the garden, the plan this spring is to replace the old lawn near the fence with raised "
    "beds. Tomatoes, courgettes and a few rows of beans should go in the sunniest corner, and the "
    "herbs will stay in pots by the kitchen door so they are easy to reach. The compost bin needs "
    "to be moved because it attracts wasps in the summer. A neighbour offered to lend us his "
    "rotavator, which would save renting one from the hardware shop for the weekend.",
    "Reading list for the next few months: a history of the Byzantine empire that a colleague "
    "recommended, two novels by a Nigerian author whose short stories I liked, and a book about "
    "habits that everyone at work seems to be talking about. I would also like to finish the "
    "biography of the physicist that I started last winter and abandoned halfway through. The "
    "library has most of these, so there is no need to buy them, except perhaps the history book.",
    "The car has been making a rattling noise from the front left wheel whenever it goes over "
    "speed bumps. The garage thinks it is a worn anti-roll bar link, which is cheap to replace, "
    "but they want to check the suspension bushes as well while the car is up on the lift. The "
    "appointment is next Thursday morning, and they can offer a courtesy car if I drop it off "
    "before eight. The annual inspection is also due in two months, so it might make sense to do "
    "both.",
    "Our book club met at Hannah's flat on Wednesday. The discussion of the novel ran long because "
    "half the group loved the ending and the other half found it rushed and unconvincing. We chose "
    "the next book by vote, a collection of essays about walking in cities, and agreed to meet in "
    "five weeks instead of four because of the holidays. Tom offered to host next time and "
    "promised to make his famous lentil soup, which nobody has ever actually tasted yet.",
]
LATE_FACT = ("One more thing to remember: Lena is severely allergic to shellfish and always "
             "carries an adrenaline pen, so restaurants have to be checked in advance.")
LONG_MEMORY = "\n\n".join([*PARAGRAPHS, LATE_FACT])
#: Asks about the last paragraph's fact in other words.
LATE_QUERY = "which seafood must be avoided when we book dinner for Lena?"
#: Asks about the first paragraph (found before and after).
EARLY_QUERY = "who is in charge of the rollback plan for the billing migration?"

UNRELATED = [
    "Prefers dark mode in every editor and terminal",
    "Is vegetarian but eats fish occasionally",
    "Works from home on Fridays",
    "Uses a standing desk and has a sore back in the evenings",
    "Supports the local football club and goes to home games",
    "Drinks two espressos every morning before nine",
    "Plays the piano badly but enjoys it",
    "Allergic to cats, fine with dogs",
    "Is learning to bake sourdough bread",
    "Takes the 8:15 train to the office on Tuesdays",
    "Wants to visit Iceland to see the northern lights",
    "Uses a password manager for all accounts",
    "Has a sister who lives in Toronto",
    "Prefers window seats on long flights",
    "Is saving up for a new bicycle",
]
