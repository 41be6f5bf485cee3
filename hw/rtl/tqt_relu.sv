// ReLU on an accumulator: max(acc, 0). Combinational.
module tqt_relu #(
    parameter int W = 32
) (
    input  logic signed [W-1:0] acc,
    output logic signed [W-1:0] out
);
  assign out = acc[W-1] ? '0 : acc;
endmodule
