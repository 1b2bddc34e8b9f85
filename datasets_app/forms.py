from django import forms

from datasets_app.services import DEFAULT_EVAL_FRACTION, MAX_EVAL_FRACTION, MIN_EVAL_FRACTION


class DatasetUploadForm(forms.Form):
    file = forms.FileField(required=False)
    name = forms.CharField(max_length=200, required=False)
    eval_percent = forms.IntegerField(
        min_value=int(MIN_EVAL_FRACTION * 100),
        max_value=int(MAX_EVAL_FRACTION * 100),
        initial=int(DEFAULT_EVAL_FRACTION * 100),
        required=False,
        label="Held out for evaluation (%)",
    )

    @property
    def eval_fraction(self) -> float:
        percent = self.cleaned_data.get("eval_percent")
        return DEFAULT_EVAL_FRACTION if percent is None else percent / 100


class EvalFileForm(forms.Form):
    file = forms.FileField(required=False)
