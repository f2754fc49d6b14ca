from engine.cli import app

app()
