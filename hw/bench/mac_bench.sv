// tqt_mac_row with its memories: x [rows, depth], w [depth, width], bias [width] and a shift per output
// column (row-major, at most ROWS, K, N); on `start` a sequencer streams, for each row and each group of
// LANES columns, the depth pairs through the unit and stores acc and q = requantize(acc, shift) in
// [rows, width] memories; `done` after the last.
module mac_bench #(
    parameter int ROWS = 1,
    parameter int K = 4,
    parameter int N = 4,
    parameter int LANES = 16,
    parameter int X_W = 9,
    parameter int W_W = 8,
    parameter int ACC_W = 32,
    parameter int OUT_W = 8,
    parameter bit OUT_SIGNED = 1,
    parameter int ROUNDING = 2,
    parameter int SHIFT_W = 8,
    parameter int MAX_LEFT = 0
) (
    input  logic        clk,
    input  logic        rst,
    input  logic        start,
    input  logic        load,  // read the input memories from <mem_dir>/<name>.hex
    input  logic        dump,  // write the result memories to <mem_dir>/<name>.out.hex
    input  logic [15:0] rows,
    input  logic [15:0] depth,
    input  logic [15:0] width,
    output logic        done
);
  localparam int X_H = 4 * ((X_W + 3) / 4), W_H = 4 * ((W_W + 3) / 4), ACC_H = 4 * ((ACC_W + 3) / 4);
  localparam int SHIFT_H = 4 * ((SHIFT_W + 3) / 4);
  logic [X_H-1:0] mem_x [ROWS*K];
  logic [W_H-1:0] mem_w [K*N];
  logic [ACC_H-1:0] mem_bias [N];
  logic [SHIFT_H-1:0] mem_shift [N];
  logic signed [63:0] mem_acc [ROWS*N], mem_q [ROWS*N];

  int r, j, i;  // the row, the first column of the lane group, the pair
  logic busy, in_valid, first, last, out_valid;
  int out_index, acc_index;  // the pair's first output, then (a cycle later) the accumulators'
  logic signed [X_W-1:0] x;
  logic [LANES*W_W-1:0] w;
  logic [LANES*ACC_W-1:0] bias, acc;
  logic [LANES*SHIFT_W-1:0] shift;
  logic [LANES*OUT_W-1:0] q;
  logic signed [63:0] acc_wide [LANES], q_wide [LANES];  // each lane's words, extended for the memories
  for (genvar l = 0; l < LANES; l++) begin : unpack
    logic signed [ACC_W-1:0] acc_lane;
    logic signed [OUT_W-1:0] q_signed;
    logic [OUT_W-1:0] q_unsigned;
    logic signed [63:0] from_signed, from_unsigned;
    assign acc_lane = acc[l*ACC_W +: ACC_W];
    assign acc_wide[l] = acc_lane;  // sign-extended
    assign q_signed = q[l*OUT_W +: OUT_W];
    assign q_unsigned = q[l*OUT_W +: OUT_W];
    assign from_signed = q_signed;  // sign-extended
    assign from_unsigned = q_unsigned;  // zero-extended
    assign q_wide[l] = OUT_SIGNED ? from_signed : from_unsigned;
  end

  always_ff @(posedge clk) begin
    done <= 0;
    acc_index <= out_index;
    if (rst) begin
      busy <= 0;
      in_valid <= 0;
    end else if (start) begin
      busy <= 1;
      r <= 0;
      j <= 0;
      i <= 0;
    end else begin
      in_valid <= busy;
      if (busy) begin  // the pair (x[r, i], w[i, j .. j + LANES - 1]) goes in next cycle
        x <= mem_x[r * int'(depth) + i][X_W-1:0];
        for (int l = 0; l < LANES; l++) begin  // bias goes with a row's first pair, shift with its last
          w[l*W_W +: W_W] <= j + l < int'(width) ? mem_w[i * int'(width) + j + l][W_W-1:0] : '0;
          if (i == 0) bias[l*ACC_W +: ACC_W] <= j + l < int'(width) ? mem_bias[j + l][ACC_W-1:0] : '0;
          if (i == int'(depth) - 1)
            shift[l*SHIFT_W +: SHIFT_W] <= j + l < int'(width) ? mem_shift[j + l][SHIFT_W-1:0] : '0;
        end
        first <= i == 0;
        last <= i == int'(depth) - 1;
        out_index <= r * int'(width) + j;
        if (i < int'(depth) - 1) i <= i + 1;
        else begin
          i <= 0;
          if (j + LANES < int'(width)) j <= j + LANES;
          else begin
            j <= 0;
            if (r < int'(rows) - 1) r <= r + 1;
            else busy <= 0;
          end
        end
      end
      if (out_valid) begin
        for (int l = 0; l < LANES; l++)
          if (acc_index % int'(width) + l < int'(width)) begin
            mem_acc[acc_index + l] <= acc_wide[l];
            mem_q[acc_index + l] <= q_wide[l];
          end
        if (!busy && !in_valid) done <= 1;
      end
    end
  end

  // the memories' files (+mem_dir=): a whole memory per pulse, no simulator call per word
  string mem_dir;
  initial if (!$value$plusargs("mem_dir=%s", mem_dir)) mem_dir = ".";
  always @(posedge load) begin
    $readmemh({mem_dir, "/mem_x.hex"}, mem_x);
    $readmemh({mem_dir, "/mem_w.hex"}, mem_w);
    $readmemh({mem_dir, "/mem_bias.hex"}, mem_bias);
    $readmemh({mem_dir, "/mem_shift.hex"}, mem_shift);
  end
  always @(posedge dump) begin
    $writememh({mem_dir, "/mem_acc.out.hex"}, mem_acc);
    $writememh({mem_dir, "/mem_q.out.hex"}, mem_q);
  end

  tqt_mac_row #(.LANES(LANES), .X_W(X_W), .W_W(W_W), .ACC_W(ACC_W), .OUT_W(OUT_W), .OUT_SIGNED(OUT_SIGNED),
                .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W), .MAX_LEFT(MAX_LEFT))
      unit (.clk(clk), .in_valid(in_valid), .first(first), .last(last), .x(x), .w(w), .bias(bias),
            .shift(shift), .out_valid(out_valid), .acc(acc), .q(q));
endmodule
