"""One module per command: the short walk from the API to the layers below (read, plan, check,
stream out) and the report it returns."""
