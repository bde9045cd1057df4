def nan_results(doc, results):
    return {"score": float("nan")}
