"""The layouts convert, combine, extract and resize write: what each names, where it keeps alpha,
what it refuses (layouts.py), and the PEFT LoHa/LoKr configs that rebuild LyCORIS shapes exactly."""
