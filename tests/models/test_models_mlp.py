from torch import nn

from uq_box.models import MLP


def test_mlp_layer_names_do_not_depend_on_dropout():
    plain, dropped = MLP(2, [8, 8], 3), MLP(2, [8, 8], 3, dropout_p=0.2)
    assert [name for name, _ in plain.named_modules()] == [
        name for name, _ in dropped.named_modules()
    ]
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert isinstance(plain.model[2], nn.Identity) and isinstance(dropped.model[2], nn.Dropout)
    assert dropped.model[2].p == 0.2
