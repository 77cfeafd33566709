"""PAWS building blocks shared by paws_train.py, fine_tune.py and nn_eval.py."""
