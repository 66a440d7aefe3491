"""Example custom functions for tool-use synthesis (`tooluse.backends.functions: examples/tools/functions.py:FUNCTIONS`).

Deterministic and offline: fixed exchange rates and a fixed weather table, so generated dialogs can be checked.
"""

RATES_PER_USD = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0}
WEATHER = {"paris": (18, "cloudy"), "berlin": (14, "rain"), "tokyo": (24, "sunny"), "new york": (21, "clear")}


def convert_currency(amount: float, from_currency: str, to_currency: str) -> dict:
    """`amount` in `from_currency` converted to `to_currency` at the fixed rates."""
    for code in (from_currency, to_currency):
        if code not in RATES_PER_USD:
            raise ValueError(f"unknown currency {code!r}; known: {', '.join(RATES_PER_USD)}")
    converted = amount / RATES_PER_USD[from_currency] * RATES_PER_USD[to_currency]
    return {"amount": round(converted, 2), "currency": to_currency}


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Current weather of `city` from the fixed table."""
    if city.lower() not in WEATHER:
        raise ValueError(f"no weather data for {city!r}")
    celsius, condition = WEATHER[city.lower()]
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32, 1)
    return {"city": city, "temperature": temperature, "unit": unit, "condition": condition}


FUNCTIONS = {"convert_currency": convert_currency, "get_weather": get_weather}
