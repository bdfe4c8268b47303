"""report/leaderboard/: the nightly leaderboard page with history.

`nights` stores each night's record in the artifact store; `figures` draws its PNGs; `page`
renders the HTML page and the Prefect markdown from all the nights.

May import: store, errors (and the rest of report/).
"""
