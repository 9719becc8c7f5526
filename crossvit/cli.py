def main():
    import crossvit.model, crossvit.export, crossvit.runtime
    print("ok", crossvit.model.__file__)
